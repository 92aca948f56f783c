//! The CUDA backend of ringkernel, and the c-host backend that executes
//! the same device loop on the host.
//!
//! **Design** (see `ARCHITECTURE.md`, *Backends: cuda*): one persistent,
//! cooperatively launched *actor-host kernel* per device hosts many actor
//! slots, one block each; a block is dormant until the host assigns it a
//! slot descriptor ([`SlotDesc`], `rk_slot_desc` in C) and serves that
//! actor until its incarnation ends — spawning or restarting a GPU actor
//! launches nothing and allocates nothing on the device. The loop
//! (`kernels/rk_loop.cuh`) speaks the protocol of `docs/protocol.md` over
//! the shared region with system-scope acquire/release PTX.
//!
//! **K2K links** ([`Runtime::connect`](ringkernel::runtime::Runtime::connect))
//! are served in place: a link's control block and ring live in pinned,
//! mapped memory, each slot reads its links from a table
//! ([`LinkTable`](ringkernel::link::LinkTable), pointed at by
//! [`SlotDesc::links`]) the host rewrites under a seqlock, and a handler's
//! send to a linked actor goes from one block to the other with no host
//! thread on the path (`docs/protocol.md`, *Links served in place*).
//!
//! **Handlers** are CUDA C++ ([`Kernel::cuda`](ringkernel::kernel::Kernel::cuda)),
//! one function per kernel type with a fixed signature:
//!
//! ```c++
//! RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg,
//!                              const uint8_t* payload, rk_reply* reply,
//!                              rk_later* later);
//! ```
//!
//! returning `RK_DONE`, `RK_REPLIED` (`reply` filled, e.g. by
//! `rk_reply_u64`), `RK_DEFERRED`, `RK_FAULT + code` or `RK_PANIC`; replies
//! to asks deferred earlier go through `rk_later_push`. Each kernel's source
//! is wrapped in its own namespace, so helpers of different kernels never
//! collide. [`translation_unit`] assembles the text; NVRTC compiles it for a
//! GPU, nvcc compiles it in CI (PTX and cubin for sm_80 and sm_90), and the
//! host C++ compiler compiles it for the c-host backend.
//!
//! **Without a GPU** — every machine that builds this project — the
//! [`CHostBackend`] runs that very loop, compiled as host C++ against
//! `kernels/rk_arch_host.h`, one OS thread per block, behind the ordinary
//! runtime: the conformance suite runs on it, so the C protocol code is
//! executed, not only compiled. The GPU path ([`probe`], [`compile_ptx`])
//! reports a missing driver, device or NVRTC as typed errors.

mod chost;
mod gpu;
mod nvrtc;
mod source;

pub use chost::{CHostBackend, DEFAULT_BLOCK_THREADS};
pub use gpu::{
    CudaBackend, CudaBackendBuilder, CudaOptions, QUIESCE_WAIT, RECALIBRATE_BRACKET,
    RECALIBRATE_EVERY,
};
pub use nvrtc::{DriverInfo, compile_cubin, compile_ptx, nvrtc_version, probe};
pub use source::{Arch, KernelSource, kernels, module_name, translation_unit};

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why the CUDA backend could not do what was asked.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver library (`libcuda`) could be loaded.
    #[error("no CUDA driver: libcuda could not be loaded (tried {tried})")]
    NoDriver {
        /// The library names tried.
        tried: String,
    },
    /// The driver loaded but reports no device (or failed to initialise).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC (`libnvrtc`) could not be loaded.
    #[error("no CUDA compiler: libnvrtc could not be loaded (tried {tried})")]
    NoCompiler {
        /// The library names tried.
        tried: String,
    },
    /// A kernel's handler does not compile; the compiler's log.
    #[error("kernel does not compile:\n{log}")]
    Compile {
        /// The compiler's log.
        log: String,
    },
    /// The host C++ compiler of the c-host backend could not be run.
    #[error("host C++ compiler `{compiler}` could not be run: {message}")]
    HostCompiler {
        /// The compiler command.
        compiler: String,
        /// Why.
        message: String,
    },
    /// A compiled module could not be loaded.
    #[error("compiled module could not be loaded: {0}")]
    Load(String),
    /// The kernel has no CUDA handler.
    #[error("kernel `{0}` has no CUDA handler")]
    NoHandler(&'static str),
    /// The kernel's state is larger than a slot may keep.
    #[error("state of {bytes} bytes exceeds the {max}-byte limit")]
    StateSize {
        /// The state's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// The device lacks something the backend needs.
    #[error("the device does not support {0}")]
    Unsupported(&'static str),
    /// More blocks asked than the device keeps resident at once (a
    /// cooperative launch needs all of them resident; no spin-barrier
    /// fallback).
    #[error("{blocks} blocks asked, the device keeps {resident} resident")]
    GridTooLarge {
        /// Blocks asked.
        blocks: u32,
        /// Blocks the device keeps resident (occupancy × SMs).
        resident: u32,
    },
    /// The kernel type was not registered when the backend was built.
    #[error(
        "kernel `{0}` is not registered with this CUDA backend (CudaBackend::builder().kernel::<K>())"
    )]
    NotRegistered(&'static str),
    /// Every block serves an actor.
    #[error("all {0} blocks of the actor-host kernel are serving actors")]
    NoFreeBlock(usize),
    /// A linked actor's previous incarnation still runs on its block (a
    /// handler that does not return): the next one would share its links'
    /// rings with it, so it is not started.
    #[error("the previous incarnation of {0:?} has not stopped (its links are shared)")]
    PreviousIncarnation(ringkernel::id::ActorId),
    /// The pinned-memory budget is spent.
    #[error("the pinned-memory budget ({0} bytes) is spent")]
    PinnedBudget(usize),
    /// An operating-system call failed (a thread, a file).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The largest kernel state a slot keeps, in bytes.
pub const MAX_STATE_BYTES: usize = 64 * 1024;

/// One actor slot of the actor-host kernel, in memory both sides see:
/// How long a launch of a linked actor waits for the block of its previous
/// incarnation to stop (a fenced loop stops within one message).
pub const PREVIOUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `rk_slot_desc` in `kernels/rk_device.cuh` (offsets asserted on both
/// sides). The host fills the plain fields while the block is dormant,
/// then store-releases `assigned`; the block store-releases `finished`
/// when the slot's incarnation has ended.
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct SlotDesc {
    /// `rk_control_block*`.
    pub control: u64,
    /// `rk_ring_header*` of H2K (the block consumes).
    pub h2k: u64,
    /// `rk_ring_header*` of K2H (the block produces).
    pub k2h: u64,
    /// The kernel's state bytes (16-byte aligned).
    pub state: u64,
    /// `const uint32_t*`: the served type ids, sorted.
    pub served: u64,
    /// c-host: `rk_host_hooks*`; CUDA: 0.
    pub hooks: u64,
    /// How many served type ids.
    pub n_served: u32,
    /// Index of the kernel's handler in the translation unit.
    pub kernel: u32,
    /// The slot's clock domain.
    pub domain: u32,
    /// Size of the state.
    pub state_bytes: u32,
    /// Host ns minus device ns (the calibration of `%globaltimer`).
    pub clock_offset: i64,
    /// The slot's HLC word (the device's).
    pub hlc: u64,
    /// The generation assigned (host, store-release).
    pub assigned: AtomicU64,
    /// The generation whose run ended (device, store-release).
    pub finished: AtomicU64,
    /// Nonzero: the block returns (host).
    pub exit: AtomicU64,
    /// Threads per message: the kernel's declared width.
    pub width: u32,
    /// A clock reading wanted (host: a new number, store-release).
    pub clock_request: AtomicU32,
    /// The device clock, read in answer (device, relaxed).
    pub clock_sample: AtomicU64,
    /// The request answered (device, store-release).
    pub clock_answer: AtomicU32,
    _pad: [u8; 4],
    /// `rk_link_table*`: the slot's K2K links (0: none), rewritten by the
    /// host while the slot runs (see [`LinkTable`](ringkernel::link::LinkTable)).
    pub links: u64,
    /// The actor's id bits: the source of the envelopes it makes.
    pub self_id: u64,
    _pad2: [u64; 14],
}

const _: () = {
    assert!(std::mem::size_of::<SlotDesc>() == 256);
    assert!(std::mem::align_of::<SlotDesc>() == 128);
    assert!(std::mem::offset_of!(SlotDesc, n_served) == 48);
    assert!(std::mem::offset_of!(SlotDesc, clock_offset) == 64);
    assert!(std::mem::offset_of!(SlotDesc, hlc) == 72);
    assert!(std::mem::offset_of!(SlotDesc, assigned) == 80);
    assert!(std::mem::offset_of!(SlotDesc, finished) == 88);
    assert!(std::mem::offset_of!(SlotDesc, exit) == 96);
    assert!(std::mem::offset_of!(SlotDesc, width) == 104);
    assert!(std::mem::offset_of!(SlotDesc, clock_request) == 108);
    assert!(std::mem::offset_of!(SlotDesc, clock_sample) == 112);
    assert!(std::mem::offset_of!(SlotDesc, clock_answer) == 120);
    assert!(std::mem::offset_of!(SlotDesc, links) == 128);
    assert!(std::mem::offset_of!(SlotDesc, self_id) == 136);
};

/// A reading of a block's clock against the host's, taken while the
/// actor-host kernel runs: what recalibrates a device's `clock_offset`
/// (the probe launch calibrates it once, before the kernel owns the device;
/// the two clocks drift).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    /// Host wall-clock ns minus device ns, at the middle of the bracket.
    pub offset_ns: i64,
    /// Host ns from the request to the answer: the offset is right to
    /// within half of it.
    pub bracket_ns: u64,
}

/// Host wall-clock time, ns since the Unix epoch (the clock HLC stamps use).
pub(crate) fn host_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Asks the block serving descriptor `d` for a reading of its clock
/// (`rk_clock_answer`: answered when its loop is idle or dormant, or every
/// 256 busy rounds), bracketed by two host clock reads; `wake` rouses the
/// block. `None` if it does not answer within `wait`. One caller per
/// descriptor at a time (the host is the request word's only writer).
///
/// # Safety
/// `d` points at a live descriptor whose block runs `rk_block_run`.
pub(crate) unsafe fn sample_clock(
    d: *mut SlotDesc,
    wake: impl Fn(),
    wait: Duration,
) -> Option<ClockSample> {
    // SAFETY: the three words are atomics inside the live descriptor (the
    // caller's promise), accessed only atomically by both sides.
    let (request, sample, answer) = unsafe {
        (
            &*std::ptr::addr_of!((*d).clock_request),
            &*std::ptr::addr_of!((*d).clock_sample),
            &*std::ptr::addr_of!((*d).clock_answer),
        )
    };
    // Relaxed: the host is the only writer of the request word.
    let want = request.load(Ordering::Relaxed).wrapping_add(1);
    let start = host_now_ns();
    // Release: pairs with the block's load-acquire of the request.
    request.store(want, Ordering::Release);
    wake();
    let deadline = Instant::now() + wait;
    loop {
        // Acquire: pairs with the block's store-release of the answer, so
        // the sample it wrote before is read below.
        if answer.load(Ordering::Acquire) == want {
            let end = host_now_ns();
            let device = sample.load(Ordering::Relaxed) as i64;
            return Some(ClockSample {
                offset_ns: start + (end - start) / 2 - device,
                bracket_ns: (end - start).max(0) as u64,
            });
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Spin for the usual quick answer; then leave the core to others.
        if start + 50_000 < host_now_ns() {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Stores a new clock offset into descriptor `d` (the loop reads it per
/// batch).
///
/// # Safety
/// `d` points at a live descriptor.
pub(crate) unsafe fn set_clock_offset(d: *mut SlotDesc, offset_ns: i64) {
    // SAFETY: the field is 8-byte aligned inside the live descriptor, and
    // both sides access it atomically once the kernel runs (the device
    // with a relaxed load).
    let word = unsafe { AtomicI64::from_ptr(std::ptr::addr_of_mut!((*d).clock_offset)) };
    // Relaxed: a lone value; nothing else is published with it.
    word.store(offset_ns, Ordering::Relaxed);
}

/// Whether a block of `block_threads` threads runs a handler of declared
/// width `width`: one thread, or whole warps (a barrier among the handler's
/// threads counts warps) up to the block's size.
pub fn runs_width(width: u32, block_threads: u32) -> bool {
    width == 1 || (width.is_multiple_of(32) && width <= block_threads)
}

/// A runtime on the backend called `name` — `cpu`, `cuda` or `c-host` —
/// for programs that take a backend option (the adapters' examples). For
/// `cuda`, `kernels` says which kernel types the actor-host kernel hosts;
/// without a usable GPU it falls back to the cpu backend and prints why.
///
/// # Errors
/// An unknown name, or a runtime that does not start.
pub fn runtime_named(
    name: &str,
    kernels: impl FnOnce(CudaBackendBuilder) -> Result<CudaBackendBuilder, CudaError>,
) -> Result<ringkernel::runtime::Runtime, Box<dyn std::error::Error>> {
    use ringkernel::runtime::Runtime;
    Ok(match name {
        "cpu" => Runtime::new()?,
        "c-host" => Runtime::builder().device(CHostBackend::new()).build()?,
        "cuda" => match kernels(CudaBackend::builder()).and_then(CudaBackendBuilder::build) {
            Ok(gpu) => {
                println!("cuda device: {}", gpu.info().name);
                Runtime::builder().device(gpu).build()?
            }
            Err(e) => {
                println!("the cuda backend is not available here ({e}); using the cpu backend");
                Runtime::new()?
            }
        },
        other => return Err(format!("unknown backend `{other}` (cpu, cuda, c-host)").into()),
    })
}

/// The value of a `--backend NAME` command-line option, else `cpu`.
pub fn backend_arg() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "cpu".into())
}
