//! The c-host backend: the actor-host device loop (`kernels/rk_loop.cuh`),
//! compiled as host C++ with the kernel's CUDA handler, run on OS threads —
//! one per block, dormant until assigned a slot, exactly as the blocks of
//! the persistent kernel are. It exists so that the C protocol code is
//! *executed* (the whole conformance suite runs on it) on machines without
//! a GPU; it is a test backend, not a way to run actors in production (the
//! cpu backend is that).
//!
//! Each kernel's translation unit is compiled by the host C++ compiler
//! (`$CXX`, else `c++`) into a shared library when its first actor is
//! launched, and loaded; a handler that does not compile fails the launch
//! with the compiler's log.

use crate::source::{Arch, KernelSource, translation_unit};
use crate::{CudaError, MAX_STATE_BYTES, PREVIOUS_WAIT, SlotDesc};
use ringkernel::backend::{DeviceBackend, DeviceSlot};
use ringkernel::control::ControlRef;
use ringkernel::id::ActorId;
use ringkernel::kernel::BackendKind;
use ringkernel::link::{LinkPort, LinkTable};
use ringkernel::ring::{Consumer, Producer};
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// `rk_host_hooks` in `kernels/rk_arch_host.h`.
#[repr(C)]
struct HostHooks {
    ctx: *const c_void,
    wake_host: extern "C" fn(*const c_void),
    wake_senders: extern "C" fn(*const c_void),
    idle: extern "C" fn(*const c_void, u32),
    links: extern "C" fn(*const c_void),
    wake_link: extern "C" fn(*const c_void, u32),
    wake_link_sender: extern "C" fn(*const c_void, u32),
}

/// What the hooks call, per assignment.
struct Wakers {
    wake_host: Box<dyn Fn() + Send>,
    wake_senders: Box<dyn Fn() + Send>,
    /// The slot's K2K links, and the table the loop reads them from
    /// (boxed: the descriptor points at it). The hook rewrites it on the
    /// loop's own thread, between batches, so the links it drops are never
    /// in use.
    links: LinkPort,
    table: Box<LinkTable>,
}

type WakerCell = Mutex<Option<Wakers>>;

/// Calls one of the block's current wakers (never unwinding into C).
fn call_waker(ctx: *const c_void, which: fn(&Wakers) -> &(dyn Fn() + Send)) {
    // SAFETY: `ctx` is the `WakerCell` of the block whose loop calls this;
    // the block (and the cell in it) outlives its thread.
    let cell = unsafe { &*ctx.cast::<WakerCell>() };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Ok(w) = cell.lock()
            && let Some(w) = &*w
        {
            which(w)();
        }
    }));
}

extern "C" fn hook_wake_host(ctx: *const c_void) {
    call_waker(ctx, |w| &*w.wake_host);
}

extern "C" fn hook_wake_senders(ctx: *const c_void) {
    call_waker(ctx, |w| &*w.wake_senders);
}

/// Runs `f` on the block's current wakers (never unwinding into C).
fn with_wakers(ctx: *const c_void, f: impl FnOnce(&mut Wakers)) {
    // SAFETY: as in `call_waker`.
    let cell = unsafe { &*ctx.cast::<WakerCell>() };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if let Ok(mut w) = cell.lock()
            && let Some(w) = &mut *w
        {
            f(w);
        }
    }));
}

extern "C" fn hook_links(ctx: *const c_void) {
    with_wakers(ctx, |w| {
        // The loop runs on the host: its addresses are the host's.
        w.links.fill_table(&w.table, |p| Some(p as u64));
    });
}

extern "C" fn hook_wake_link(ctx: *const c_void, row: u32) {
    with_wakers(ctx, |w| w.links.wake_outbound(row as usize));
}

extern "C" fn hook_wake_link_sender(ctx: *const c_void, row: u32) {
    with_wakers(ctx, |w| w.links.wake_inbound_sender(row as usize));
}

extern "C" fn hook_idle(_ctx: *const c_void, ns: u32) {
    // The doorbell (or an assignment, or exit) unparks the thread.
    std::thread::park_timeout(Duration::from_nanos(u64::from(ns)));
}

/// One compiled kernel.
struct Module {
    run: unsafe extern "C" fn(*mut SlotDesc, u32),
    // Kept loaded while any block runs its code (blocks hold the Arc).
    _lib: libloading::Library,
}

/// What an assigned slot's loop touches, kept alive while it may.
struct Assignment {
    /// The actor (this incarnation).
    actor: ActorId,
    _control: ControlRef,
    _h2k: Consumer,
    _k2h: Producer,
    /// `Box<[u128]>` turned raw: the loop writes through its pointer.
    state: *mut [u128],
    /// `Box<[u32]>` turned raw: the loop reads through its pointer.
    served: *mut [u32],
}

// SAFETY: the raw parts are owned boxes (freed in Drop); the rest is Send.
unsafe impl Send for Assignment {}

impl Drop for Assignment {
    fn drop(&mut self) {
        // SAFETY: both came from Box::into_raw in `launch_slot` and are freed
        // once, here; the block no longer runs this slot (an assignment is
        // dropped only when replaced on a dormant block, or with the block).
        unsafe {
            drop(Box::from_raw(self.state));
            drop(Box::from_raw(self.served));
        }
    }
}

/// The descriptor, shared with the block's thread.
struct DescCell(UnsafeCell<SlotDesc>);

// The assignment protocol: the host writes plain fields only while the
// block is dormant (after acquiring `finished`, before releasing
// `assigned`); the block reads them only after acquiring `assigned`.
// SAFETY: per that protocol no plain field is accessed by both at once;
// the generation and exit words are atomics.
unsafe impl Sync for DescCell {}

/// One block: a thread running `rk_host_block_run` on its descriptor.
struct Block {
    desc: DescCell,
    /// Boxed: the descriptor points at it.
    hooks: Box<HostHooks>,
    /// Boxed: the hooks point at it.
    wakers: Box<WakerCell>,
    module: Arc<Module>,
    assignment: Mutex<Option<Assignment>>,
    returned: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    handle: Mutex<Option<Thread>>,
}

// SAFETY: `hooks.ctx` points at the boxed `wakers` of the same block (a
// Mutex, Sync); every other field is Sync.
unsafe impl Sync for Block {}
// SAFETY: as for Sync; the raw pointer is only dereferenced by the hooks.
unsafe impl Send for Block {}

impl Block {
    fn desc(&self) -> *mut SlotDesc {
        self.desc.0.get()
    }

    /// The assignment protocol's words (atomics inside the descriptor),
    /// without a reference to the rest of it (which the block writes).
    fn words(&self) -> (&AtomicU64, &AtomicU64, &AtomicU64) {
        let d = self.desc();
        // SAFETY: the three fields are atomics, only ever accessed
        // atomically by both sides, inside the block's descriptor, which
        // lives as long as `self`.
        unsafe {
            (
                &*std::ptr::addr_of!((*d).assigned),
                &*std::ptr::addr_of!((*d).finished),
                &*std::ptr::addr_of!((*d).exit),
            )
        }
    }

    fn dormant(&self) -> bool {
        let (assigned, finished, _) = self.words();
        // Acquire pairs with the block's store-release of `finished`: its
        // run's accesses to the descriptor happened before.
        !self.returned.load(Ordering::Acquire)
            && finished.load(Ordering::Acquire) == assigned.load(Ordering::Relaxed)
    }
}

/// The c-host backend: the actor-host device loop compiled as host C++
/// with each kernel's CUDA handler (by `$CXX`, else `c++`, when its first
/// actor launches; a handler that does not compile fails the launch with
/// the compiler's log), one OS thread per block, dormant until assigned a
/// slot as the GPU's blocks are. A test backend: it executes the C protocol
/// code where there is no GPU; the cpu backend is the production one.
///
/// ```no_run
/// let rt = ringkernel::runtime::Runtime::builder()
///     .device(ringkernel_cuda::CHostBackend::new())
///     .build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CHostBackend {
    /// Fences stop the loop first, as the cuda backend's do on a device
    /// without host-native atomics ([`CHostBackend::quiescing`]).
    quiesce: bool,
    /// Threads per block (one OS thread each; thread 0 runs the loop).
    block_threads: u32,
    compiler: String,
    flags: Vec<String>,
    dir: PathBuf,
    modules: Mutex<HashMap<ModuleKey, Arc<Module>>>,
    blocks: Mutex<Vec<(ModuleKey, Arc<Block>)>>,
    /// One clock exchange at a time (the host writes the request word).
    clock: Mutex<()>,
}

/// The backend's blocks, locked.
type Blocks<'a> = std::sync::MutexGuard<'a, Vec<(ModuleKey, Arc<Block>)>>;

/// A kernel's identity: name, handler source (address, length), later cap.
type ModuleKey = (&'static str, usize, usize, u32);

impl std::fmt::Debug for CHostBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CHostBackend")
            .field("compiler", &self.compiler)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// Threads per c-host block by default: as many as a CUDA block has by
/// default ([`CudaOptions::threads_per_block`](crate::CudaOptions)), so a
/// kernel of width up to a warp runs on both.
pub const DEFAULT_BLOCK_THREADS: u32 = 32;

impl CHostBackend {
    /// A backend compiling with `$CXX` (else `c++`), extra flags from
    /// `$RINGKERNEL_CHOST_CXXFLAGS`.
    pub fn new() -> Arc<Self> {
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let flags = std::env::var("RINGKERNEL_CHOST_CXXFLAGS")
            .map(|f| f.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "ringkernel-c-host-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        Arc::new(CHostBackend {
            quiesce: false,
            block_threads: DEFAULT_BLOCK_THREADS,
            compiler,
            flags,
            dir,
            modules: Mutex::new(HashMap::new()),
            blocks: Mutex::new(Vec::new()),
            clock: Mutex::new(()),
        })
    }

    /// As [`CHostBackend::new`], with every fence preceded by a stop the
    /// loop acknowledges — the cuda backend's protocol on a device whose
    /// atomics are not atomic with the host's — so that path runs here too.
    pub fn quiescing() -> Arc<Self> {
        let mut b = Self::new();
        if let Some(b) = Arc::get_mut(&mut b) {
            b.quiesce = true;
        }
        b
    }

    /// As [`CHostBackend::new`], with `threads` threads per block (1..=1024;
    /// default [`DEFAULT_BLOCK_THREADS`]): handlers of declared width up to
    /// it run, each message on that many OS threads.
    ///
    /// # Errors
    /// [`CudaError::Unsupported`] for 0 or more than 1024.
    pub fn with_block_threads(threads: u32) -> Result<Arc<Self>, CudaError> {
        if !(1..=1024).contains(&threads) {
            return Err(CudaError::Unsupported("c-host blocks of 1..=1024 threads"));
        }
        let mut b = Self::new();
        if let Some(b) = Arc::get_mut(&mut b) {
            b.block_threads = threads;
        }
        Ok(b)
    }

    /// How many blocks (threads) the backend has started: a terminated
    /// actor's block serves the next launch of its kernel.
    pub fn blocks(&self) -> usize {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reads the clock of block `i` through its running loop (serving an
    /// actor or dormant) against the host's — the exchange the cuda backend
    /// recalibrates `clock_offset` with, here between two readings of the
    /// same clock. `None` without such a block, or if it does not answer
    /// within 100 ms.
    pub fn sample_clock(&self, i: usize) -> Option<crate::ClockSample> {
        let _one = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let block = self
            .blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)?
            .1
            .clone();
        if block.returned.load(Ordering::Acquire) {
            return None;
        }
        let thread = block
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        // SAFETY: the descriptor lives in `block` (held here), whose thread
        // runs the loop (it has not returned, checked above; one that has
        // since does not answer and this times out).
        unsafe { crate::sample_clock(block.desc(), || thread.unpark(), Duration::from_millis(100)) }
    }

    /// How many of them are dormant (serving no actor).
    pub fn dormant_blocks(&self) -> usize {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        blocks.iter().filter(|(_, b)| b.dormant()).count()
    }

    /// Compiles (once) and loads the module of `kernel`.
    fn module(&self, kernel: KernelSource) -> Result<(ModuleKey, Arc<Module>), CudaError> {
        let h = kernel.handler;
        let key = (
            kernel.name,
            h.source.as_ptr() as usize,
            h.source.len(),
            h.max_later,
        );
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(&key) {
            return Ok((key, m.clone()));
        }
        std::fs::create_dir_all(&self.dir)?;
        let stem = format!(
            "{}-{}",
            kernel
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>(),
            modules.len()
        );
        let src = self.dir.join(format!("{stem}.cpp"));
        let lib = self.dir.join(format!("lib{stem}.so"));
        std::fs::write(&src, translation_unit(Arch::Host, &[kernel]))?;
        let out = std::process::Command::new(&self.compiler)
            .args(["-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-pthread"])
            .args(["-Wall", "-Wextra", "-Wno-unused-parameter"])
            .args(&self.flags)
            .arg(&src)
            .arg("-o")
            .arg(&lib)
            .output()
            .map_err(|e| CudaError::HostCompiler {
                compiler: self.compiler.clone(),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(CudaError::Compile {
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        // SAFETY: the library is the one just built from our translation
        // unit; its initialisers are the C++ runtime's only.
        let lib = unsafe { libloading::Library::new(&lib) }
            .map_err(|e| CudaError::Load(e.to_string()))?;
        // SAFETY: `rk_host_block_run` is defined by rk_actor_host.cuh with
        // exactly this signature (extern "C", an `rk_slot_desc*` and the
        // block's thread count).
        let run =
            unsafe { lib.get::<unsafe extern "C" fn(*mut SlotDesc, u32)>(b"rk_host_block_run\0") }
                .map_err(|e| CudaError::Load(e.to_string()))?;
        let module = Arc::new(Module {
            run: *run,
            _lib: lib,
        });
        modules.insert(key, module.clone());
        Ok((key, module))
    }

    /// A dormant block of `module`, or a new one. The caller holds the
    /// blocks' lock until it has assigned the block (so two launches never
    /// take one block).
    fn block(
        &self,
        blocks: &mut Vec<(ModuleKey, Arc<Block>)>,
        key: ModuleKey,
        module: &Arc<Module>,
    ) -> Result<Arc<Block>, CudaError> {
        if let Some((_, b)) = blocks.iter().find(|(k, b)| *k == key && b.dormant()) {
            return Ok(b.clone());
        }
        let wakers: Box<WakerCell> = Box::new(Mutex::new(None));
        let hooks = Box::new(HostHooks {
            ctx: std::ptr::from_ref(&*wakers).cast(),
            wake_host: hook_wake_host,
            wake_senders: hook_wake_senders,
            idle: hook_idle,
            links: hook_links,
            wake_link: hook_wake_link,
            wake_link_sender: hook_wake_link_sender,
        });
        let block = Arc::new(Block {
            desc: DescCell(UnsafeCell::new(SlotDesc::default())),
            hooks,
            wakers,
            module: module.clone(),
            assignment: Mutex::new(None),
            returned: AtomicBool::new(false),
            thread: Mutex::new(None),
            handle: Mutex::new(None),
        });
        // SAFETY: no thread runs this block yet.
        unsafe { (*block.desc()).hooks = std::ptr::from_ref(&*block.hooks) as u64 };
        let b = block.clone();
        let threads = self.block_threads;
        let join = std::thread::Builder::new()
            .name("ringkernel-c-host".into())
            .spawn(move || {
                // SAFETY: the descriptor lives in `b`, which this thread
                // owns a reference to; the module's code stays loaded
                // (`b.module`); the loop follows the assignment protocol.
                unsafe { (b.module.run)(b.desc(), threads) };
                b.returned.store(true, Ordering::Release);
            })?;
        *block.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(join.thread().clone());
        *block.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(join);
        blocks.push((key, block.clone()));
        Ok(block)
    }

    /// Waits (at most [`PREVIOUS_WAIT`]) until no block runs an earlier
    /// incarnation of `actor`, which shares its links' rings: one with
    /// links out of it would produce into them (`sends`: then a loop still
    /// running after the wait refuses the launch); a receiver's old loop,
    /// fenced, touches no ring once it sees the fence, so after the wait
    /// (it is in a handler that does not return) the launch goes on.
    fn previous_stopped<'a>(
        &'a self,
        mut blocks: Blocks<'a>,
        actor: ActorId,
        sends: bool,
    ) -> Result<Blocks<'a>, CudaError> {
        let deadline = Instant::now() + PREVIOUS_WAIT;
        loop {
            let running = blocks.iter().any(|(_, b)| {
                !b.dormant()
                    && b.assignment
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .is_some_and(|a| {
                            a.actor != actor
                                && a.actor.with_incarnation(0) == actor.with_incarnation(0)
                        })
            });
            if !running {
                return Ok(blocks);
            }
            if Instant::now() > deadline {
                if !sends {
                    tracing::warn!(
                        ?actor,
                        "launched beside a previous incarnation stuck in a handler"
                    );
                    return Ok(blocks);
                }
                return Err(CudaError::PreviousIncarnation(actor));
            }
            drop(blocks);
            std::thread::sleep(Duration::from_micros(100));
            blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    fn launch_slot(&self, slot: DeviceSlot) -> Result<Thread, CudaError> {
        let handler = slot.code.cuda.ok_or(CudaError::NoHandler(slot.kernel))?;
        if slot.state.len() > MAX_STATE_BYTES {
            return Err(CudaError::StateSize {
                bytes: slot.state.len(),
                max: MAX_STATE_BYTES,
            });
        }
        let (key, module) = self.module(KernelSource {
            name: slot.kernel,
            handler,
        })?;
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if slot.links.has_outbound() || slot.links.has_inbound() {
            blocks = self.previous_stopped(blocks, slot.id, slot.links.has_outbound())?;
        }
        let block = self.block(&mut blocks, key, &module)?;
        let mut state = vec![0u128; slot.state.len().div_ceil(16).max(1)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u128, u8>(&mut state)[..slot.state.len()]
            .copy_from_slice(&slot.state);
        let n_served = slot.served.len();
        let state = Box::into_raw(state);
        let served = Box::into_raw(slot.served.clone().into_boxed_slice());
        let table = Box::new(LinkTable::default());
        let d = block.desc();
        // SAFETY: the block is dormant (its `finished` was acquired equal to
        // `assigned`, or it is new): its thread reads no plain field until
        // the store-release below.
        let generation = unsafe {
            (*d).control = slot.control.as_ptr() as u64;
            (*d).h2k = slot.h2k.ring_base().as_ptr() as u64;
            (*d).k2h = slot.k2h.ring_base().as_ptr() as u64;
            (*d).state = state.cast::<u128>() as u64;
            (*d).state_bytes = slot.state.len() as u32;
            (*d).served = served.cast::<u32>() as u64;
            (*d).n_served = n_served as u32;
            (*d).kernel = 0;
            (*d).domain = slot.domain.to_bits();
            (*d).clock_offset = 0;
            (*d).hlc = 0;
            (*d).width = slot.width;
            (*d).links = std::ptr::from_ref::<LinkTable>(&table) as u64;
            (*d).self_id = slot.id.to_bits();
            (*d).assigned.load(Ordering::Relaxed) + 1
        };
        *block.wakers.lock().unwrap_or_else(|p| p.into_inner()) = Some(Wakers {
            wake_host: slot.wake_host,
            wake_senders: slot.wake_senders,
            links: slot.links,
            table,
        });
        *block.assignment.lock().unwrap_or_else(|p| p.into_inner()) = Some(Assignment {
            actor: slot.id,
            _control: slot.control,
            _h2k: slot.h2k,
            _k2h: slot.k2h,
            state,
            served,
        });
        // Publishes the descriptor; pairs with the block's load-acquire.
        block.words().0.store(generation, Ordering::Release);
        let thread = block
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| CudaError::Load("block thread missing".into()))?;
        drop(blocks);
        thread.unpark();
        Ok(thread)
    }
}

impl DeviceBackend for CHostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn launch(&self, slot: DeviceSlot) -> Result<Thread, String> {
        self.launch_slot(slot).map_err(|e| e.to_string())
    }

    fn max_width(&self) -> u32 {
        self.block_threads
    }

    /// As on a GPU: one thread, or whole warps up to the block's threads.
    fn supports_width(&self, threads: u32) -> bool {
        crate::runs_width(threads, self.block_threads)
    }

    /// The C loop serves K2K links in place, as on a GPU.
    fn serves_links(&self) -> bool {
        true
    }

    fn links_in_place(&self) -> bool {
        true
    }

    fn quiesce(&self, control: &ringkernel::control::ControlBlock) {
        if self.quiesce {
            crate::gpu::stop_and_wait(control);
        }
    }
}

/// How long dropping the backend waits for its blocks to return before it
/// leaves a hung one running (its memory is the block's own, kept alive
/// by its thread).
const EXIT_WAIT: Duration = Duration::from_secs(5);

impl Drop for CHostBackend {
    fn drop(&mut self) {
        let blocks = std::mem::take(&mut *self.blocks.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, b) in &blocks {
            // Pairs with the block's load-acquire of `exit`.
            b.words().2.store(1, Ordering::Release);
            if let Some(t) = &*b.handle.lock().unwrap_or_else(|p| p.into_inner()) {
                t.unpark();
            }
        }
        let deadline = Instant::now() + EXIT_WAIT;
        for (_, b) in &blocks {
            while !b.returned.load(Ordering::Acquire) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if b.returned.load(Ordering::Acquire)
                && let Some(j) = b.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
            {
                let _ = j.join();
            } else {
                tracing::warn!("a c-host block did not return; left running");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
