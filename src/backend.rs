//! GPU backends: how the runtime launches an actor slot on a device other
//! than the built-in cpu backend.
//!
//! A backend crate (`ringkernel-wgpu`, `ringkernel-cuda`) implements
//! [`DeviceBackend`] and is given to
//! [`RuntimeBuilder::device`](crate::runtime::RuntimeBuilder::device). The
//! runtime keeps everything host-side — the actor's identity and home, the
//! waiter slab, the H2K writer, the K2H poller, faults, supervision — and
//! hands the backend one [`DeviceSlot`] per launch: the slot's control
//! block, the consuming end of its H2K ring, the producing end of its K2H
//! ring, and the kernel's code for that backend. From then on the backend's
//! device loop speaks the protocol of `docs/protocol.md` over them, exactly
//! as the cpu backend's does; the rest of the runtime cannot tell them
//! apart.

use crate::control::{ControlBlock, ControlRef};
use crate::id::{ActorId, ClockDomain};
use crate::kernel::BackendKind;
use crate::region::{HeapRegion, SharedMemory};
use crate::ring::{Consumer, Producer};
use std::sync::Arc;
use std::thread::Thread;

/// A kernel's handler in WGSL (see the `ringkernel-wgpu` crate for the
/// signature it must have).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgslHandler {
    /// The WGSL source of `rk_handle` and its helpers.
    pub source: &'static str,
    /// The message type ids it serves.
    pub types: &'static [u32],
    /// The most replies to deferred asks one run may make (`later.n`).
    pub max_later: u32,
}

/// A kernel's handler in CUDA C++ (see the `ringkernel-cuda` crate for the
/// signature it must have). The same source is compiled by NVRTC for a GPU
/// and by the host C++ compiler for the c-host backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaHandler {
    /// The CUDA C++ source of `rk_handle` and its helpers.
    pub source: &'static str,
    /// The message type ids it serves.
    pub types: &'static [u32],
    /// The most replies to deferred asks one run may make (`later->n`).
    pub max_later: u32,
}

/// A kernel's code for the device backends: what
/// [`Kernel::wgsl`](crate::kernel::Kernel::wgsl) and
/// [`Kernel::cuda`](crate::kernel::Kernel::cuda) give.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCode {
    /// The WGSL handler, if any.
    pub wgsl: Option<WgslHandler>,
    /// The CUDA C++ handler, if any.
    pub cuda: Option<CudaHandler>,
}

impl DeviceCode {
    /// The code of kernel `K`.
    pub fn of<K: crate::kernel::Kernel>() -> Self {
        DeviceCode {
            wgsl: K::wgsl(),
            cuda: K::cuda(),
        }
    }

    /// The `max_later` of the code for `backend` (0 without code).
    pub fn max_later_for(&self, backend: BackendKind) -> u32 {
        match backend {
            BackendKind::Cpu => 0,
            BackendKind::Cuda => self.cuda.map_or(0, |c| c.max_later),
            BackendKind::Wgpu => self.wgsl.map_or(0, |w| w.max_later),
        }
    }

    /// The message types served by the code for `backend` (`None`: the
    /// kernel has no code for it).
    pub fn types_for(&self, backend: BackendKind) -> Option<&'static [u32]> {
        match backend {
            BackendKind::Cpu => None,
            BackendKind::Cuda => self.cuda.map(|c| c.types),
            BackendKind::Wgpu => self.wgsl.map(|w| w.types),
        }
    }
}

/// The most replies to deferred asks one handler run may make
/// (`max_later`); a launch also needs K2H to hold `1 + max_later`.
pub const MAX_LATER: u32 = 64;

/// Everything a backend needs to serve one actor slot.
pub struct DeviceSlot {
    /// The actor (this incarnation).
    pub id: ActorId,
    /// The kernel's name.
    pub kernel: &'static str,
    /// The slot's control block: the device acknowledges states, commits,
    /// reports progress and faults here, and obeys the fence.
    pub control: ControlRef,
    /// The H2K ring's consuming end.
    pub h2k: Consumer,
    /// The K2H ring's producing end.
    pub k2h: Producer,
    /// The message types the slot serves (sorted).
    pub served: Vec<u32>,
    /// Device threads per message (the kernel's declared width; at most
    /// the backend's [`DeviceBackend::max_width`]).
    pub width: u32,
    /// The initial state, as bytes (the kernel's `State`).
    pub state: Vec<u8>,
    /// The slot's clock domain (stamps what it sends).
    pub domain: ClockDomain,
    /// The kernel's device code.
    pub code: DeviceCode,
    /// Wakes the runtime's poller (after publishing to K2H or acknowledging
    /// a state).
    pub wake_host: Box<dyn Fn() + Send>,
    /// Wakes senders waiting for H2K room (after releasing H2K slots).
    pub wake_senders: Box<dyn Fn() + Send>,
    /// The slot's K2K links, for a backend that serves them
    /// ([`DeviceBackend::serves_links`]); others leave it alone.
    pub links: crate::link::LinkPort,
}

impl std::fmt::Debug for DeviceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSlot")
            .field("id", &self.id)
            .field("kernel", &self.kernel)
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

/// A device backend the runtime launches actor slots on.
pub trait DeviceBackend: Send + Sync + 'static {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Whether kernel code for this backend is there (checked before any
    /// launch work).
    fn has_handler(&self, code: &DeviceCode) -> bool {
        code.types_for(self.kind()).is_some()
    }

    /// The most device threads one slot's handler may use per message
    /// (wider declared widths are refused at launch). Default 1.
    fn max_width(&self) -> u32 {
        1
    }

    /// Whether the backend runs handlers of declared width `threads`
    /// (checked at launch; a width it cannot run is a typed error).
    /// Default: any up to [`DeviceBackend::max_width`].
    fn supports_width(&self, threads: u32) -> bool {
        threads <= self.max_width()
    }

    /// Whether the backend's loop serves K2K links through
    /// [`DeviceSlot::links`] (else [`Runtime::connect`](crate::runtime::Runtime::connect)
    /// refuses links on it). Default: no.
    fn serves_links(&self) -> bool {
        false
    }

    /// Whether the backend's device loop serves K2K links *in place*, from
    /// a table of each slot's links in memory it sees (cuda, c-host): then
    /// a slot has at most [`MAX_SLOT_LINKS`](crate::link::MAX_SLOT_LINKS)
    /// links each way, and link memory comes from
    /// [`DeviceBackend::slot_memory`]. Default: no.
    fn links_in_place(&self) -> bool {
        false
    }

    /// Called before the host fences an incarnation (the commit word's
    /// `fetch_or`): a backend whose device cannot make that RMW atomic with
    /// its own commit CAS (CUDA over PCIe without host-native atomics)
    /// stops the slot's loop first — or waits out a bound, for a hung one.
    /// Default: nothing (the two are atomic with each other).
    fn quiesce(&self, control: &ControlBlock) {
        let _ = control;
    }

    /// Zeroed memory for one slot's control block and rings, `bytes` long,
    /// which the device can see (pinned and mapped host memory on CUDA).
    /// The default is the heap, for backends whose device loop runs on the
    /// host.
    ///
    /// # Errors
    /// A message saying why there is none (a pinned-memory budget spent).
    fn slot_memory(&self, bytes: usize) -> Result<Arc<dyn SharedMemory>, String> {
        Ok(Arc::new(HeapRegion::zeroed(bytes)))
    }

    /// Starts serving `slot`; returns the thread its doorbell wakes.
    ///
    /// # Errors
    /// A message saying why the device could not take the slot (the kernel
    /// does not compile, the device is lost): the launch fails with
    /// [`LaunchError::Backend`](crate::runtime::LaunchError::Backend).
    fn launch(&self, slot: DeviceSlot) -> Result<Thread, String>;
}
