//! The cuda backend proper: one cooperative, persistent launch of the
//! actor-host kernel per device, its blocks dormant until assigned a slot.
//!
//! **Never executed yet**: no machine that built this had a GPU. Every
//! piece it shares with the c-host backend (the loop, the descriptor, the
//! assignment protocol) runs in CI there; what only runs here — driver
//! calls, mapped memory, the cooperative launch, the host-side monitor —
//! is compiled and reviewed, and its first run is `tests/gpu.rs` on a GPU
//! machine (see `docs/BENCHMARKS.md`, *GPU check*).
//!
//! Layout in memory both sides see, allocated once at start (no allocation
//! and no launch while the kernel runs):
//! - the descriptors: one [`SlotDesc`] per block, pinned and mapped;
//! - the slot arena: pinned, mapped host memory the runtime lays each
//!   slot's control block and rings in ([`DeviceBackend::slot_memory`]),
//!   carved first-fit from a fixed budget;
//! - the states: device memory, `max_state_bytes` per block, copied in at
//!   assignment on a second stream.
//!
//! The device cannot wake a host thread, so a monitor thread polls every
//! assigned slot's K2H tail, acknowledged state and H2K head, and wakes the
//! runtime's poller and senders when they move (spinning 50 µs after any
//! movement, then backing off to 200 µs); it also queries the stream, and
//! a sticky device error faults every assigned slot (`DeviceError`).

use crate::source::{Arch, KernelSource, translation_unit};
use crate::{ClockSample, CudaError, DriverInfo, SlotDesc};
use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use ringkernel::backend::{CudaHandler, DeviceBackend, DeviceSlot};
use ringkernel::control::{ControlBlock, ControlRef, FaultCode, LifecycleState};
use ringkernel::id::ActorId;
use ringkernel::kernel::{BackendKind, Kernel};
use ringkernel::link::{LinkPort, LinkTable};
use ringkernel::region::{Placed, SharedMemory};
use ringkernel::ring::{Consumer, Producer};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Sizes of a [`CudaBackend`].
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Blocks (actor slots hosted at once); `None`: as many as the device
    /// keeps resident (occupancy × SMs), at most 1024.
    pub blocks: Option<u32>,
    /// Threads per block (handlers run on thread 0; width Thread).
    pub threads_per_block: u32,
    /// Pinned, mapped host memory for control blocks and rings.
    pub pinned_bytes: usize,
    /// Device memory per block for the kernel's state.
    pub max_state_bytes: usize,
    /// Where compiled modules are cached and looked up
    /// ([`module_name`](crate::module_name)); default
    /// `$RINGKERNEL_CUDA_MODULES`, else none.
    pub module_cache: Option<std::path::PathBuf>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            blocks: None,
            threads_per_block: 32,
            pinned_bytes: 64 << 20,
            max_state_bytes: 4096,
            module_cache: std::env::var_os("RINGKERNEL_CUDA_MODULES").map(Into::into),
        }
    }
}

/// Registers the kernel types a [`CudaBackend`] hosts, then starts it.
#[derive(Debug, Default)]
pub struct CudaBackendBuilder {
    kernels: Vec<KernelSource>,
    options: CudaOptions,
}

impl CudaBackendBuilder {
    /// Hosts kernel `K` (its CUDA handler is compiled with the loop).
    ///
    /// # Errors
    /// [`CudaError::NoHandler`] when `K` has no CUDA handler.
    pub fn kernel<K: Kernel>(mut self) -> Result<Self, CudaError> {
        let handler = K::cuda().ok_or(CudaError::NoHandler(K::NAME))?;
        if !self.kernels.iter().any(|k| same(&k.handler, &handler)) {
            self.kernels.push(KernelSource {
                name: K::NAME,
                handler,
            });
        }
        Ok(self)
    }

    /// Sets the sizes.
    pub fn options(mut self, options: CudaOptions) -> Self {
        self.options = options;
        self
    }

    /// Probes the driver and device, compiles the loop with every
    /// registered handler (NVRTC, for the device's architecture), sizes the
    /// grid by occupancy, allocates everything, and launches the kernel.
    ///
    /// # Errors
    /// [`CudaError::NoDriver`], [`CudaError::NoDevice`],
    /// [`CudaError::NoCompiler`], [`CudaError::Compile`] (with NVRTC's log),
    /// [`CudaError::Unsupported`] (no cooperative launch or mapped memory),
    /// [`CudaError::GridTooLarge`], [`CudaError::Driver`].
    pub fn build(self) -> Result<Arc<CudaBackend>, CudaError> {
        CudaBackend::start(self.kernels, self.options)
    }
}

fn same(a: &CudaHandler, b: &CudaHandler) -> bool {
    a.source.as_ptr() == b.source.as_ptr() && a.source.len() == b.source.len()
}

fn driver(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::Driver(format!("{what}: {e:?}"))
}

/// Pinned host memory mapped into the device (no write-combining: both
/// sides read it).
struct Pinned {
    host: NonNull<u8>,
    dev: u64,
    len: usize,
    /// Kept alive (and bound) until the memory is freed: releasing the
    /// primary context frees its pinned memory under whoever still holds it.
    ctx: Arc<CudaContext>,
}

// SAFETY: the allocation is owned by this value; concurrent access to its
// bytes is governed by the protocols laid over it (atomics for every word
// two sides touch).
unsafe impl Send for Pinned {}
// SAFETY: as for Send.
unsafe impl Sync for Pinned {}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, CudaError> {
        ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: a plain allocation call; the context is current.
        let host = unsafe { cudarc::driver::result::malloc_host(len, flags) }
            .map_err(driver("cuMemHostAlloc"))?;
        let host = NonNull::new(host.cast::<u8>())
            .ok_or_else(|| CudaError::Driver("cuMemHostAlloc gave null".into()))?;
        // SAFETY: `host` points at `len` bytes just allocated.
        unsafe { std::ptr::write_bytes(host.as_ptr(), 0, len) };
        let mut dev = 0;
        // SAFETY: `host` is mapped (DEVICEMAP); `dev` is a valid out pointer.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host.as_ptr().cast(), 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: allocated above, not shared yet.
            let _ = unsafe { cudarc::driver::result::free_host(host.as_ptr().cast()) };
            return Err(CudaError::Driver(format!(
                "cuMemHostGetDevicePointer: {r:?}"
            )));
        }
        Ok(Pinned {
            host,
            dev,
            len,
            ctx: ctx.clone(),
        })
    }

    /// The device address of host address `p` inside this allocation.
    fn dev_addr(&self, p: *const u8) -> Option<u64> {
        let off = (p as usize).checked_sub(self.host.as_ptr() as usize)?;
        (off < self.len).then(|| self.dev + off as u64)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Whichever thread drops the last region needs the context.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc in `new`; dropped only once
        // the device no longer runs (see CudaBackend's Drop).
        let _ = unsafe { cudarc::driver::result::free_host(self.host.as_ptr().cast()) };
    }
}

/// The slot arena: first-fit over a fixed pinned allocation.
struct Arena {
    mem: Pinned,
    /// Free spans (offset, length), sorted by offset.
    free: Mutex<Vec<(usize, usize)>>,
}

const ARENA_ALIGN: usize = 128;

impl Arena {
    /// An 8-byte word for the device to write (a probe's), and its device
    /// address.
    fn word(self: &Arc<Self>) -> Result<(ArenaRegion, u64), CudaError> {
        let word = self.alloc(8).ok_or(CudaError::PinnedBudget(self.mem.len))?;
        let dev = self
            .mem
            .dev_addr(word.base().as_ptr())
            .ok_or_else(|| CudaError::Driver("a word outside the arena".into()))?;
        Ok((word, dev))
    }

    fn alloc(self: &Arc<Self>, bytes: usize) -> Option<ArenaRegion> {
        let len = bytes.max(1).next_multiple_of(ARENA_ALIGN);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free.iter().position(|&(_, l)| l >= len)?;
        let (off, l) = free[i];
        if l == len {
            free.remove(i);
        } else {
            free[i] = (off + len, l - len);
        }
        drop(free);
        // SAFETY: the span is inside the allocation and now ours alone.
        unsafe { std::ptr::write_bytes(self.mem.host.as_ptr().add(off), 0, len) };
        Some(ArenaRegion {
            arena: self.clone(),
            off,
            len,
        })
    }

    fn release(&self, off: usize, len: usize) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let i = free.partition_point(|&(o, _)| o < off);
        free.insert(i, (off, len));
        // Coalesce with the neighbours.
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
    }
}

/// One slot's span of the arena.
struct ArenaRegion {
    arena: Arc<Arena>,
    off: usize,
    len: usize,
}

impl Drop for ArenaRegion {
    fn drop(&mut self) {
        self.arena.release(self.off, self.len);
    }
}

// SAFETY: the span lies inside the pinned allocation, which the Arc keeps
// alive and never moves; it starts at a 128-byte offset of a page-aligned
// allocation; it is handed to one slot only until dropped.
unsafe impl SharedMemory for ArenaRegion {
    fn base(&self) -> NonNull<u8> {
        // SAFETY: `off < len of the allocation`.
        unsafe { self.arena.mem.host.add(self.off) }
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// What an assigned block's slot needs kept and watched.
struct Assigned {
    /// The actor (this incarnation).
    actor: ActorId,
    control: ControlRef,
    h2k: Consumer,
    k2h: Producer,
    wake_host: Box<dyn Fn() + Send>,
    wake_senders: Box<dyn Fn() + Send>,
    /// The served type ids the device reads.
    _served: ArenaRegion,
    /// The slot's K2K links, and the table (pinned) the device serves
    /// them from, rewritten by the monitor when they change.
    links: LinkPort,
    table: Placed<LinkTable>,
    /// Last seen: K2H published, H2K released, acknowledged state.
    seen: (u64, u64, Option<LifecycleState>),
}

struct Block {
    /// The generation last assigned.
    generation: u64,
    slot: Option<Assigned>,
}

struct Gpu {
    // Dropped first: the pinned memory (which keeps the context itself).
    descs: Pinned,
    arena: Arc<Arena>,
    /// `rk_clock_probe`: also the launch-per-message baseline.
    probe: CudaFunction,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    /// The launch-per-message baselines' own stream (a capture on `copy`
    /// would record a spawn's state copy, or fail on its synchronise).
    baseline: Arc<CudaStream>,
    /// The graph baseline, captured before the persistent kernel started
    /// (`None` if its capture failed: that baseline is then an error).
    probe_graph: Mutex<Option<ProbeGraph>>,
    _module: Arc<CudaModule>,
    kernels: Vec<KernelSource>,
    states: u64,
    options: CudaOptions,
    blocks: Mutex<Vec<Block>>,
    failed: AtomicBool,
    /// The backend is shutting the kernel down: its end is no failure.
    stopping: AtomicBool,
    stop: AtomicBool,
    /// The kernel has returned (set by the backend's Drop).
    returned: AtomicBool,
    info: DriverInfo,
    /// One clock exchange at a time (the host writes the request word).
    clock: Mutex<()>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // The descriptors' and arena's cuMemFreeHost (their own Drop) and
        // the states' cuMemFree need the context on this thread.
        let _ = self.ctx.bind_to_thread();
        if self.returned.load(Ordering::Acquire) {
            // SAFETY: the kernel has returned: nothing on the device uses
            // the states any more.
            let _ = unsafe { cudarc::driver::result::free_sync(self.states) };
        }
    }
}

impl Gpu {
    fn desc(&self, i: usize) -> *mut SlotDesc {
        // SAFETY: `i < blocks`, and the descriptors are `blocks` SlotDescs.
        unsafe { self.descs.host.as_ptr().cast::<SlotDesc>().add(i) }
    }

    /// The descriptor's generation words (no reference to the rest, which
    /// the device writes).
    fn words(&self, i: usize) -> (&AtomicU64, &AtomicU64, &AtomicU64) {
        let d = self.desc(i);
        // SAFETY: atomics inside the pinned descriptor array, accessed only
        // atomically by both sides, alive as long as `self`.
        unsafe {
            (
                &*std::ptr::addr_of!((*d).assigned),
                &*std::ptr::addr_of!((*d).finished),
                &*std::ptr::addr_of!((*d).exit),
            )
        }
    }
}

/// The cuda backend: GPU actors served by the persistent actor-host kernel.
///
/// ```no_run
/// use ringkernel::conformance::Probe;
/// let backend = ringkernel_cuda::CudaBackend::builder().kernel::<Probe>()?.build()?;
/// let rt = ringkernel::runtime::Runtime::builder().device(backend).build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    monitor: Thread,
    join: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.gpu.info)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// A builder: register kernel types, then [`CudaBackendBuilder::build`].
    pub fn builder() -> CudaBackendBuilder {
        CudaBackendBuilder::default()
    }

    /// The device.
    pub fn info(&self) -> &DriverInfo {
        &self.gpu.info
    }

    /// How many blocks (actor slots at once) the kernel hosts.
    pub fn blocks(&self) -> usize {
        self.gpu.blocks.lock().map_or(0, |b| b.len())
    }

    /// Reads the device clock through the running kernel (block 0 answers,
    /// serving or dormant) against the host's; a tight enough reading
    /// (bracket at most [`RECALIBRATE_BRACKET`]) becomes every slot's
    /// `clock_offset`. The monitor does this every [`RECALIBRATE_EVERY`];
    /// `None` if the kernel did not answer within 5 ms.
    pub fn recalibrate(&self) -> Option<ClockSample> {
        recalibrate(&self.gpu)
    }

    fn start(kernels: Vec<KernelSource>, options: CudaOptions) -> Result<Arc<Self>, CudaError> {
        let info = crate::probe()?;
        if !info.host_native_atomics {
            // The commit word is CAS'd by the device and fenced by the host;
            // without host-native atomics the two are not atomic with each
            // other (see docs/protocol.md, *Commit and fence*).
            tracing::info!(
                device = %info.name,
                "no host-native atomics: a fence first stops the slot's loop (quiesce)"
            );
        }
        let ctx = CudaContext::new(0).map_err(driver("cuCtxCreate"))?;
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        if attr(Attr::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) == 0 {
            return Err(CudaError::Unsupported("cooperative launch"));
        }
        if attr(Attr::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY) == 0
            || attr(Attr::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING) == 0
        {
            return Err(CudaError::Unsupported("mapped host memory"));
        }
        // SAFETY: every allocation of this backend is raw (driver calls), so
        // cudarc's event tracking has nothing to track; turning it off
        // keeps it from recording events on our streams.
        unsafe { ctx.disable_event_tracking() };
        // Both streams are CU_STREAM_NON_BLOCKING (cudarc's new_stream).
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let copy = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let baseline = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let (major, minor) = info.compute_capability;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let module = load_module(
            &ctx,
            &translation_unit(Arch::Cuda, &kernels),
            arch,
            options.module_cache.as_deref(),
        )?;
        let host_fn = module
            .load_function("rk_actor_host")
            .map_err(driver("rk_actor_host"))?;
        let probe_fn = module
            .load_function("rk_clock_probe")
            .map_err(driver("rk_clock_probe"))?;
        let per_sm = host_fn
            .occupancy_max_active_blocks_per_multiprocessor(options.threads_per_block, 0, None)
            .map_err(driver("occupancy"))?;
        let sms = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).max(0) as u32;
        let resident = per_sm.saturating_mul(sms);
        // By default one block per SM is left free: a kernel launched beside
        // the persistent one (the launch-per-message baseline) can run.
        let blocks = options
            .blocks
            .unwrap_or(resident.saturating_sub(sms).clamp(1, 1024));
        if blocks == 0 || blocks > resident {
            return Err(CudaError::GridTooLarge { blocks, resident });
        }
        let descs = Pinned::new(&ctx, blocks as usize * std::mem::size_of::<SlotDesc>())?;
        let arena = Arc::new(Arena {
            mem: Pinned::new(&ctx, options.pinned_bytes.max(ARENA_ALIGN))?,
            free: Mutex::new(vec![(0, options.pinned_bytes.max(ARENA_ALIGN))]),
        });
        let state_bytes = options.max_state_bytes.next_multiple_of(16) * blocks as usize;
        // SAFETY: a plain device allocation; the context is current.
        let states = unsafe { cudarc::driver::result::malloc_sync(state_bytes.max(16)) }
            .map_err(driver("cuMemAlloc"))?;
        let offset = match calibrate(&copy, &probe_fn, &arena) {
            Ok(o) => o,
            Err(e) => {
                // SAFETY: allocated above; nothing runs on the device yet.
                let _ = unsafe { cudarc::driver::result::free_sync(states) };
                return Err(e);
            }
        };
        let probe_graph = capture_probe(&baseline, &probe_fn, &arena)
            .inspect_err(|e| tracing::warn!(error = %e, "no CUDA-graph baseline"))
            .ok();
        for i in 0..blocks as usize {
            // SAFETY: the descriptors are ours alone until the launch below.
            unsafe { (*descs.host.as_ptr().cast::<SlotDesc>().add(i)).clock_offset = offset };
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (options.threads_per_block, 1, 1),
            shared_mem_bytes: 0,
        };
        let (desc_arg, n_arg) = (descs.dev, blocks);
        // SAFETY: `rk_actor_host(rk_slot_desc*, uint32_t)`: the arguments
        // are a device pointer to `blocks` descriptors (mapped, alive until
        // the kernel has returned: see Drop) and their count; the grid fits
        // the device's co-residency (checked), as a cooperative launch must.
        let launched = unsafe {
            stream
                .launch_builder(&host_fn)
                .arg(&desc_arg)
                .arg(&n_arg)
                .launch_cooperative(cfg)
        };
        if let Err(e) = launched {
            // SAFETY: allocated above; the kernel did not start.
            let _ = unsafe { cudarc::driver::result::free_sync(states) };
            return Err(driver("cuLaunchCooperativeKernel")(e));
        }
        let gpu = Arc::new(Gpu {
            probe: probe_fn,
            ctx,
            stream,
            copy,
            baseline,
            probe_graph: Mutex::new(probe_graph),
            _module: module,
            kernels,
            descs,
            arena,
            states,
            options,
            blocks: Mutex::new(
                (0..blocks)
                    .map(|_| Block {
                        generation: 0,
                        slot: None,
                    })
                    .collect(),
            ),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            returned: AtomicBool::new(false),
            info,
            clock: Mutex::new(()),
        });
        let g = gpu.clone();
        let join = match std::thread::Builder::new()
            .name("ringkernel-cuda-monitor".into())
            .spawn(move || monitor(&g))
        {
            Ok(j) => j,
            Err(e) => {
                // The kernel runs: ask it to return, and leak what it may
                // still touch if it does not.
                gpu.stopping.store(true, Ordering::Release);
                for i in 0..blocks as usize {
                    gpu.words(i).2.store(1, Ordering::Release);
                }
                if !wait_for_return(&gpu.stream) {
                    std::mem::forget(gpu);
                }
                return Err(e.into());
            }
        };
        Ok(Arc::new(CudaBackend {
            gpu,
            monitor: join.thread().clone(),
            join: Mutex::new(Some(join)),
        }))
    }

    /// The baseline a persistent kernel is measured against: `n` messages
    /// each served by a kernel launch of its own (`rk_clock_probe`, on the
    /// second stream, beside the actor-host kernel), the host spinning on
    /// the mapped word it writes. Returns the time taken.
    ///
    /// # Errors
    /// [`CudaError::Driver`]; [`CudaError::PinnedBudget`].
    pub fn launch_per_message(&self, n: u64) -> Result<Duration, CudaError> {
        self.per_message(n, false)
    }

    /// The same with each launch replayed from a CUDA graph (captured once,
    /// uploaded before the first): the other baseline, a launch with the
    /// driver's per-launch setup taken out.
    ///
    /// # Errors
    /// As [`CudaBackend::launch_per_message`].
    pub fn graph_launch_per_message(&self, n: u64) -> Result<Duration, CudaError> {
        self.per_message(n, true)
    }

    fn per_message(&self, n: u64, graph: bool) -> Result<Duration, CudaError> {
        let g = &self.gpu;
        g.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        // The graph and its word, held for the run (one run at a time).
        let held = graph.then(|| g.probe_graph.lock().unwrap_or_else(|p| p.into_inner()));
        let probe_graph = match held.as_deref() {
            Some(Some(p)) => Some(p),
            Some(None) => {
                return Err(CudaError::Driver(
                    "no CUDA-graph baseline: its capture failed at start".into(),
                ));
            }
            None => None,
        };
        let own = match probe_graph {
            Some(_) => None,
            None => Some(g.arena.word()?),
        };
        let (word, dev) = match (probe_graph, &own) {
            // The graph captured the address.
            (Some(p), _) => (&p.word, 0),
            (None, Some((w, d))) => (w, *d),
            (None, None) => return Err(CudaError::Driver("no baseline word".into())),
        };
        let flag = word.base().as_ptr().cast::<u64>();
        let start = Instant::now();
        for _ in 0..n {
            // SAFETY: the word is ours, 8 bytes, aligned; the device's last
            // write to it was observed (or it is fresh).
            unsafe { std::ptr::write_volatile(flag, 0) };
            match probe_graph {
                Some(p) => p.graph.launch().map_err(driver("cuGraphLaunch"))?,
                None => {
                    // SAFETY: as in `calibrate`: a mapped pointer to the
                    // word, alive until the spin below has seen the write.
                    unsafe {
                        g.baseline
                            .launch_builder(&g.probe)
                            .arg(&dev)
                            .launch(PROBE_LAUNCH)
                    }
                    .map_err(driver("rk_clock_probe"))?;
                }
            }
            // SAFETY: the device writes the word with st.release.sys; this
            // volatile read sees it once it lands.
            let deadline = Instant::now() + Duration::from_secs(5);
            while unsafe { std::ptr::read_volatile(flag) } == 0 {
                if Instant::now() > deadline || g.failed.load(Ordering::Acquire) {
                    // The launch may still run and write the word: it is
                    // never given back, so the write cannot land in a
                    // reused span (the graph's word is the graph's for
                    // good).
                    std::mem::forget(own);
                    return Err(CudaError::Driver(
                        "the probe launch never ran (no room beside the persistent kernel?)".into(),
                    ));
                }
                std::hint::spin_loop();
            }
        }
        let took = start.elapsed();
        g.baseline
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        Ok(took)
    }

    fn launch_slot(&self, slot: DeviceSlot) -> Result<Thread, CudaError> {
        let g = &self.gpu;
        g.ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        if g.failed.load(Ordering::Acquire) {
            return Err(CudaError::Driver(
                "the device failed (a sticky error)".into(),
            ));
        }
        let handler = slot.code.cuda.ok_or(CudaError::NoHandler(slot.kernel))?;
        let kernel = g
            .kernels
            .iter()
            .position(|k| same(&k.handler, &handler))
            .ok_or(CudaError::NotRegistered(slot.kernel))?;
        if slot.state.len() > g.options.max_state_bytes {
            return Err(CudaError::StateSize {
                bytes: slot.state.len(),
                max: g.options.max_state_bytes,
            });
        }
        let dev = |p: *const u8| {
            g.arena
                .mem
                .dev_addr(p)
                .ok_or_else(|| CudaError::Driver("slot memory outside the pinned arena".into()))
        };
        let control = dev(slot.control.as_ptr().cast())?;
        let h2k = dev(slot.h2k.ring_base().as_ptr())?;
        let k2h = dev(slot.k2h.ring_base().as_ptr())?;
        let mut blocks = g.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if slot.links.has_outbound() || slot.links.has_inbound() {
            // An earlier incarnation still running (fenced, in a handler)
            // shares its links' rings: wait for its block to finish. One
            // with links out of it would produce into them (the launch is
            // refused after the wait); a receiver's fenced loop touches no
            // ring once it sees the fence (the launch goes on).
            let deadline = Instant::now() + crate::PREVIOUS_WAIT;
            loop {
                let running = blocks.iter().enumerate().any(|(j, b)| {
                    b.slot.as_ref().is_some_and(|s| {
                        s.actor != slot.id
                            && s.actor.with_incarnation(0) == slot.id.with_incarnation(0)
                            && g.words(j).1.load(Ordering::Acquire) != b.generation
                    })
                });
                if !running {
                    break;
                }
                if Instant::now() > deadline {
                    if !slot.links.has_outbound() {
                        tracing::warn!(actor = ?slot.id, "launched beside a previous incarnation stuck in a handler");
                        break;
                    }
                    return Err(CudaError::PreviousIncarnation(slot.id));
                }
                drop(blocks);
                std::thread::sleep(Duration::from_micros(100));
                blocks = g.blocks.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
        let i = (0..blocks.len())
            .find(|&i| {
                let (_, finished, _) = g.words(i);
                // Acquire pairs with the block's store-release of `finished`.
                finished.load(Ordering::Acquire) == blocks[i].generation
            })
            .ok_or(CudaError::NoFreeBlock(blocks.len()))?;
        let stride = g.options.max_state_bytes.next_multiple_of(16);
        let state = g.states + (i * stride) as u64;
        if !slot.state.is_empty() {
            // SAFETY: `state` has `stride >= slot.state.len()` bytes of
            // device memory owned by block `i` (dormant: no kernel touches
            // it); the source lives until the synchronize below.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(state, &slot.state, g.copy.cu_stream())
                    .map_err(driver("cuMemcpyHtoDAsync"))?;
            }
        }
        g.copy
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        let served = g
            .arena
            .alloc(slot.served.len() * 4)
            .ok_or(CudaError::PinnedBudget(g.options.pinned_bytes))?;
        // SAFETY: the span has room for the served ids and is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(
                slot.served.as_ptr(),
                served.base().as_ptr().cast::<u32>(),
                slot.served.len(),
            );
        }
        let served_dev = dev(served.base().as_ptr())?;
        let table_mem: Arc<dyn SharedMemory> = Arc::new(
            g.arena
                .alloc(std::mem::size_of::<LinkTable>())
                .ok_or(CudaError::PinnedBudget(g.options.pinned_bytes))?,
        );
        // SAFETY: a fresh arena span of the table's size, 128-aligned (the
        // arena's alignment), this slot's alone.
        let table = unsafe { Placed::init_in(table_mem, 0, LinkTable::default()) }
            .map_err(|e| CudaError::Driver(e.to_string()))?;
        let mut links = slot.links;
        // The rows the loop starts from (link memory is the arena's too).
        links.fill_table(&table, |p| g.arena.mem.dev_addr(p));
        let table_dev = dev(std::ptr::from_ref::<LinkTable>(&table).cast())?;
        let d = g.desc(i);
        let generation = blocks[i].generation + 1;
        // SAFETY: block `i` is dormant (acquired above): the device reads no
        // plain field of its descriptor until the store-release below.
        unsafe {
            (*d).control = control;
            (*d).h2k = h2k;
            (*d).k2h = k2h;
            (*d).state = state;
            (*d).state_bytes = slot.state.len() as u32;
            (*d).served = served_dev;
            (*d).n_served = slot.served.len() as u32;
            (*d).kernel = kernel as u32;
            (*d).width = slot.width;
            (*d).domain = slot.domain.to_bits();
            (*d).links = table_dev;
            (*d).self_id = slot.id.to_bits();
            (*d).hlc = 0;
        }
        blocks[i] = Block {
            generation,
            slot: Some(Assigned {
                actor: slot.id,
                control: slot.control,
                h2k: slot.h2k,
                k2h: slot.k2h,
                wake_host: slot.wake_host,
                wake_senders: slot.wake_senders,
                _served: served,
                links,
                table,
                seen: (0, 0, None),
            }),
        };
        // Publishes the descriptor; pairs with the block's ld.acquire.sys.
        g.words(i).0.store(generation, Ordering::Release);
        drop(blocks);
        self.monitor.unpark();
        Ok(self.monitor.clone())
    }
}

/// Loads the module for `tu` on `arch`: a cached cubin (or PTX) by its
/// [`module_name`](crate::module_name), else NVRTC's cubin (then cached).
/// A cubin is machine code: a driver of the CUDA major it was built for
/// loads it whatever the NVRTC minor (PTX from a newer NVRTC would not). A
/// cached image that does not load (stale, or for another driver) falls
/// back to the next; NVRTC runs only when none loads (it takes seconds).
fn load_module(
    ctx: &Arc<CudaContext>,
    tu: &str,
    arch: &'static str,
    cache: Option<&std::path::Path>,
) -> Result<Arc<CudaModule>, CudaError> {
    let name = crate::module_name(tu, arch);
    let load = |image: cudarc::nvrtc::Ptx| {
        ctx.load_module(image)
            .map_err(|e| CudaError::Load(format!("cuModuleLoadData: {e:?}")))
    };
    let mut last = None;
    if let Some(dir) = cache {
        if let Ok(cubin) = std::fs::read(dir.join(format!("{name}.cubin"))) {
            tracing::info!(module = %name, "cached cubin");
            match load(cudarc::nvrtc::Ptx::from_binary(cubin)) {
                Ok(m) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
        if let Ok(ptx) = std::fs::read_to_string(dir.join(format!("{name}.ptx"))) {
            tracing::info!(module = %name, "cached PTX");
            match load(cudarc::nvrtc::Ptx::from_src(ptx)) {
                Ok(m) => return Ok(m),
                Err(e) => last = Some(e),
            }
        }
    }
    match crate::compile_cubin(tu, arch) {
        Ok(cubin) => {
            if let Some(dir) = cache {
                let _ = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(dir.join(format!("{name}.cubin")), &cubin));
            }
            load(cudarc::nvrtc::Ptx::from_binary(cubin))
        }
        // A cached module that would not load says more than a missing
        // compiler (a compile error, with its log, says most).
        Err(e @ CudaError::NoCompiler { .. }) => Err(last.unwrap_or(e)),
        Err(e) => Err(e),
    }
}

/// Host minus device time (ns), from one probe launch bracketed by host
/// clock reads.
fn calibrate(
    stream: &Arc<CudaStream>,
    probe: &CudaFunction,
    arena: &Arc<Arena>,
) -> Result<i64, CudaError> {
    let (out, dev) = arena.word()?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
    };
    // The tightest of a few brackets (the first launch pays for loading).
    let mut best: Option<(i64, i64)> = None;
    for _ in 0..5 {
        let before = now();
        // SAFETY: `rk_clock_probe(uint64_t*)` gets a mapped device pointer
        // to 8 bytes that live until the synchronize below.
        unsafe {
            stream.launch_builder(probe).arg(&dev).launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(driver("rk_clock_probe"))?;
        stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        let after = now();
        // SAFETY: the probe finished (synchronized); the word is ours.
        let device = unsafe { std::ptr::read_volatile(out.base().as_ptr().cast::<u64>()) } as i64;
        let width = after - before;
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, (before + after) / 2 - device));
        }
    }
    Ok(best.map_or(0, |(_, offset)| offset))
}

/// How often the monitor reads the device clock through the running kernel
/// to recalibrate `clock_offset`.
pub const RECALIBRATE_EVERY: Duration = Duration::from_secs(10);

/// The widest host bracket of a clock reading that is used (the offset is
/// then right to within half of it).
pub const RECALIBRATE_BRACKET: Duration = Duration::from_micros(200);

fn recalibrate(g: &Gpu) -> Option<ClockSample> {
    let _one = g.clock.lock().unwrap_or_else(|p| p.into_inner());
    if g.failed.load(Ordering::Acquire) || g.returned.load(Ordering::Acquire) {
        return None;
    }
    // A block serving an actor answers within its idle back-off (20 µs); a
    // dormant one within 1 ms, too loose a bracket: ask serving blocks
    // first, and keep the tightest of a few readings.
    let mut order: Vec<usize> = {
        let blocks = g.blocks.lock().unwrap_or_else(|p| p.into_inner());
        (0..blocks.len())
            .filter(|&i| blocks[i].slot.is_some())
            .collect()
    };
    order.push(0);
    let mut best: Option<ClockSample> = None;
    for &i in order.iter().take(3) {
        // SAFETY: descriptor `i` is alive as long as `g`, and its block runs
        // the loop (the kernel has not returned, checked above; a block that
        // has since does not answer and this times out).
        let reading = unsafe { crate::sample_clock(g.desc(i), || {}, Duration::from_millis(2)) };
        if let Some(r) = reading
            && best.is_none_or(|b| r.bracket_ns < b.bracket_ns)
        {
            best = Some(r);
        }
    }
    let sample = best?;
    if sample.bracket_ns <= RECALIBRATE_BRACKET.as_nanos() as u64 {
        let blocks = g.blocks.lock().map_or(0, |b| b.len());
        for i in 0..blocks {
            // SAFETY: `i < blocks`: a live descriptor.
            unsafe { crate::set_clock_offset(g.desc(i), sample.offset_ns) };
        }
        tracing::debug!(?sample, "clock recalibrated");
    }
    Some(sample)
}

/// One thread, one block: the probe's launch.
const PROBE_LAUNCH: LaunchConfig = LaunchConfig {
    grid_dim: (1, 1, 1),
    block_dim: (1, 1, 1),
    shared_mem_bytes: 0,
};

/// The graph baseline: one launch of `rk_clock_probe` writing `word`,
/// captured, instantiated and uploaded before the persistent kernel starts
/// (instantiation and upload may allocate on the device, and an allocation
/// may wait for work the persistent kernel never finishes).
struct ProbeGraph {
    graph: cudarc::driver::CudaGraph,
    word: ArenaRegion,
}

// SAFETY: the graph's handles are driver objects usable from any thread
// with the context bound (every use binds it first); the region is Send
// and Sync by itself. Held behind a Mutex: one launch sequence at a time.
unsafe impl Send for ProbeGraph {}
// SAFETY: as for Send; `&ProbeGraph` only launches (behind the Mutex).
unsafe impl Sync for ProbeGraph {}

fn capture_probe(
    stream: &Arc<CudaStream>,
    probe: &CudaFunction,
    arena: &Arc<Arena>,
) -> Result<ProbeGraph, CudaError> {
    let (word, dev) = arena.word()?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver("cuStreamBeginCapture"))?;
    // SAFETY: `rk_clock_probe(uint64_t*)` gets a mapped pointer to the
    // word, which lives as long as the graph (both in the ProbeGraph);
    // captured, the launch runs only when the graph is launched.
    let captured = unsafe { stream.launch_builder(probe).arg(&dev).launch(PROBE_LAUNCH) };
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(driver("cuStreamEndCapture"))?;
    captured.map_err(driver("rk_clock_probe"))?;
    let graph = graph.ok_or_else(|| CudaError::Driver("the capture made no graph".into()))?;
    graph.upload().map_err(driver("cuGraphUpload"))?;
    stream
        .synchronize()
        .map_err(driver("cuStreamSynchronize"))?;
    Ok(ProbeGraph { graph, word })
}

/// How long the monitor sleeps with nothing in flight (a sender's doorbell
/// ends it early).
const MONITOR_NAP: Duration = Duration::from_micros(200);

/// The host side of the cuda backend's wake-ups and failure detection.
fn monitor(g: &Arc<Gpu>) {
    if let Err(e) = g.ctx.bind_to_thread() {
        tracing::error!(error = ?e, "the CUDA monitor cannot bind the context");
    }
    let mut last_activity = Instant::now();
    let mut last_query = Instant::now();
    let mut last_calibration = Instant::now();
    while !g.stop.load(Ordering::Acquire) {
        if last_calibration.elapsed() >= RECALIBRATE_EVERY {
            last_calibration = Instant::now();
            // It waits for the device's answers (up to 3 × 2 ms): on a
            // thread of its own, so no reply waits for it here.
            let gpu = Arc::clone(g);
            if std::thread::Builder::new()
                .name("ringkernel-cuda-clock".into())
                .spawn(move || {
                    let _ = gpu.ctx.bind_to_thread();
                    let _ = recalibrate(&gpu);
                })
                .is_err()
            {
                let _ = recalibrate(g);
            }
        }
        let (mut moved, mut busy) = (false, false);
        {
            let mut blocks = g.blocks.lock().unwrap_or_else(|p| p.into_inner());
            for (i, b) in blocks.iter_mut().enumerate() {
                // The slot's run is over (the block touches nothing of it
                // after its release of `finished`): its memory goes back.
                if b.slot.is_some() && g.words(i).1.load(Ordering::Acquire) == b.generation {
                    if let Some(s) = &b.slot {
                        (s.wake_host)();
                    }
                    b.slot = None;
                    continue;
                }
                let Some(s) = &mut b.slot else { continue };
                // A connect or a departure changed the slot's links: the
                // device takes the new rows between its batches.
                s.links.fill_table(&s.table, |p| g.arena.mem.dev_addr(p));
                let published = s.k2h.observer().published();
                let h2k = s.h2k.observer();
                let released = h2k.released();
                // Messages the device has not answered yet: their replies
                // come soon, and a parked monitor would see them only
                // after its nap.
                busy |= h2k.published() > released;
                let state = s.control.acked_state().ok();
                if published != s.seen.0 || state != s.seen.2 {
                    (s.wake_host)();
                    moved = true;
                }
                if released != s.seen.1 {
                    (s.wake_senders)();
                    moved = true;
                }
                s.seen = (published, released, state);
            }
        }
        if last_query.elapsed() > Duration::from_millis(10) {
            last_query = Instant::now();
            // SAFETY: a query of our own stream.
            let r = unsafe { sys::cuStreamQuery(g.stream.cu_stream()) };
            if r != sys::CUresult::CUDA_ERROR_NOT_READY {
                if !g.stopping.load(Ordering::Acquire) {
                    fail_all(g, r);
                }
                return;
            }
        }
        if moved || busy {
            last_activity = Instant::now();
        } else if last_activity.elapsed() > Duration::from_micros(50) {
            let napped = Instant::now();
            std::thread::park_timeout(MONITOR_NAP);
            if napped.elapsed() < MONITOR_NAP {
                // Woken early: a sender rang a parked slot's doorbell, so
                // its reply follows; watch for it awake.
                last_activity = Instant::now();
            }
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The kernel ended (an error, or it returned unasked): every assigned
/// slot faults with `DeviceError` — a sticky error fails every actor of the
/// device — and no slot is launched again.
fn fail_all(g: &Gpu, r: sys::CUresult) {
    g.failed.store(true, Ordering::Release);
    tracing::error!(result = ?r, "the actor-host kernel ended; every actor on the device fails");
    let blocks = g.blocks.lock().unwrap_or_else(|p| p.into_inner());
    for b in blocks.iter() {
        if let Some(s) = &b.slot {
            let c = &s.control;
            if !c.acked_state().is_ok_and(LifecycleState::is_final) {
                // The device is gone: the host writes the device line.
                c.report_fault(FaultCode::DeviceError, r as u64, c.incarnation());
                (s.wake_host)();
            }
        }
    }
}

impl DeviceBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn slot_memory(&self, bytes: usize) -> Result<Arc<dyn SharedMemory>, String> {
        self.gpu
            .arena
            .alloc(bytes)
            .map(|r| Arc::new(r) as Arc<dyn SharedMemory>)
            .ok_or_else(|| CudaError::PinnedBudget(self.gpu.options.pinned_bytes).to_string())
    }

    fn launch(&self, slot: DeviceSlot) -> Result<Thread, String> {
        self.launch_slot(slot).map_err(|e| e.to_string())
    }

    fn max_width(&self) -> u32 {
        self.gpu.options.threads_per_block
    }

    /// One thread, or whole warps up to the block's threads (a barrier
    /// among a handler's threads counts warps).
    fn supports_width(&self, threads: u32) -> bool {
        crate::runs_width(threads, self.gpu.options.threads_per_block)
    }

    /// Without host-native atomics the host's fence (`fetch_or` on the
    /// commit word) and the device's commit CAS are not atomic with each
    /// other: the slot's loop is asked to stop first (Terminated, a word
    /// only the host writes), and the fence waits for its acknowledgement —
    /// after which the device writes the commit word no more. A hung loop
    /// never acknowledges; after [`QUIESCE_WAIT`] the fence goes ahead (a
    /// loop that wakes later finds the fence bit when it reads the word).
    /// The device loop serves K2K links in place: link memory is pinned
    /// and mapped (from [`DeviceBackend::slot_memory`]), each slot reads
    /// its links from a table the monitor rewrites, and a receiver polls
    /// its links (its idle back-off, at most 20 µs, bounds the latency).
    fn serves_links(&self) -> bool {
        true
    }

    fn links_in_place(&self) -> bool {
        true
    }

    fn quiesce(&self, control: &ControlBlock) {
        if !self.gpu.info.host_native_atomics {
            stop_and_wait(control);
        }
    }
}

/// How long a fence waits for a slot's loop to acknowledge a stop.
pub const QUIESCE_WAIT: Duration = Duration::from_millis(500);

/// Asks the slot's loop to stop (unless it has) and waits, at most
/// [`QUIESCE_WAIT`], for its acknowledgement.
pub(crate) fn stop_and_wait(control: &ControlBlock) {
    let stopped = || control.acked_state().is_ok_and(LifecycleState::is_final);
    if stopped() {
        return;
    }
    let _ = control.request(LifecycleState::Terminated);
    let deadline = Instant::now() + QUIESCE_WAIT;
    while !stopped() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// How long dropping the backend waits for the kernel to return before it
/// leaks the memory a hung block may still touch.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// Waits (bounded) for the persistent kernel to return after `exit`;
/// whether it returned cleanly.
fn wait_for_return(stream: &CudaStream) -> bool {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        // SAFETY: a query of our own stream.
        let r = unsafe { sys::cuStreamQuery(stream.cu_stream()) };
        if r != sys::CUresult::CUDA_ERROR_NOT_READY {
            return r == sys::CUresult::CUDA_SUCCESS;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let g = &self.gpu;
        let _ = g.ctx.bind_to_thread();
        g.stopping.store(true, Ordering::Release);
        let n = g.blocks.lock().unwrap_or_else(|p| p.into_inner()).len();
        for i in 0..n {
            // Pairs with the blocks' ld.acquire.sys of `exit`.
            g.words(i).2.store(1, Ordering::Release);
        }
        let returned = wait_for_return(&g.stream);
        g.stop.store(true, Ordering::Release);
        self.monitor.unpark();
        if let Some(j) = self.join.lock().ok().and_then(|mut j| j.take()) {
            let _ = j.join();
        }
        if returned {
            g.returned.store(true, Ordering::Release);
        } else {
            // A hung block may still touch the descriptors, the arena and
            // the states: leak them rather than free them under it.
            tracing::error!("the actor-host kernel did not return; its memory is leaked");
            std::mem::forget(self.gpu.clone());
        }
    }
}
