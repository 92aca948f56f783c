//! [`WgpuBackend`]: the wgpu backend as the runtime sees it.

use crate::{DispatchLoop, LoopSlot, Program, SlotCell, WgpuDevice, WgpuError, WgslKernel};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The wgpu backend for a [`Runtime`](ringkernel::runtime::Runtime): one
/// device, one dispatch loop serving every actor slot launched on it.
///
/// ```no_run
/// # use std::sync::Arc;
/// let backend = ringkernel_wgpu::WgpuBackend::new()?; // NoAdapter without a GPU or lavapipe
/// let rt = ringkernel::runtime::Runtime::builder().device(backend).build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct WgpuBackend {
    device: Arc<WgpuDevice>,
    dispatch: DispatchLoop,
    programs: Mutex<HashMap<ProgramKey, Arc<Program>>>,
}

/// A compiled kernel's identity: name, handler source, state words, later
/// entries, width.
type ProgramKey = (&'static str, usize, u32, u32, u32);

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl WgpuBackend {
    /// Opens the first adapter and starts the dispatch loop.
    ///
    /// # Errors
    /// [`WgpuError::NoAdapter`], [`WgpuError::Device`], or the loop's
    /// thread would not start ([`WgpuError::Operation`]).
    pub fn new() -> Result<Arc<Self>, WgpuError> {
        Self::with_in_flight(2)
    }

    /// As [`WgpuBackend::new`], with at most `in_flight` dispatches in
    /// flight (1 or 2; 2 is the default: the host publishes one while the
    /// device runs the next).
    ///
    /// # Errors
    /// As [`WgpuBackend::new`].
    pub fn with_in_flight(in_flight: usize) -> Result<Arc<Self>, WgpuError> {
        let device = Arc::new(WgpuDevice::new()?);
        let dispatch = DispatchLoop::start_with(device.clone(), in_flight)
            .map_err(|e| WgpuError::Operation(e.to_string()))?;
        Ok(Arc::new(WgpuBackend {
            device,
            dispatch,
            programs: Mutex::new(HashMap::new()),
        }))
    }

    /// The device.
    pub fn device(&self) -> &WgpuDevice {
        &self.device
    }

    /// What the dispatch loop has done (dispatches, and how many were
    /// submitted while another was in flight).
    pub fn stats(&self) -> crate::DispatchStats {
        self.dispatch.stats()
    }

    fn program(&self, kernel: WgslKernel) -> Result<Arc<Program>, WgpuError> {
        let key = (
            kernel.name,
            kernel.handler.as_ptr() as usize,
            kernel.state_words,
            kernel.max_later,
            kernel.width,
        );
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = programs.get(&key) {
            return Ok(p.clone());
        }
        let p = Arc::new(self.device.compile(&kernel)?);
        programs.insert(key, p.clone());
        Ok(p)
    }
}

impl ringkernel::backend::DeviceBackend for WgpuBackend {
    fn kind(&self) -> ringkernel::kernel::BackendKind {
        ringkernel::kernel::BackendKind::Wgpu
    }

    fn max_width(&self) -> u32 {
        crate::MAX_WIDTH
    }

    /// K2K links are host-mediated here: the dispatch loop moves their
    /// messages between dispatches.
    fn serves_links(&self) -> bool {
        true
    }

    fn launch(&self, slot: ringkernel::backend::DeviceSlot) -> Result<std::thread::Thread, String> {
        let Some(wgsl) = slot.code.wgsl else {
            return Err(format!("kernel {} has no WGSL handler", slot.kernel));
        };
        if !slot.state.len().is_multiple_of(4) {
            return Err(format!(
                "kernel {}: a state of {} bytes is not whole 32-bit words",
                slot.kernel,
                slot.state.len()
            ));
        }
        let mut state: Vec<u32> = slot
            .state
            .chunks(4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .collect();
        if state.is_empty() {
            state.push(0);
        }
        let program = self
            .program(WgslKernel {
                name: slot.kernel,
                state_words: state.len() as u32,
                handler: wgsl.source,
                max_later: wgsl.max_later,
                width: slot.width,
            })
            .map_err(|e| e.to_string())?;
        self.dispatch.add(LoopSlot {
            id: slot.id,
            control: slot.control,
            h2k: slot.h2k,
            k2h: slot.k2h,
            served: slot.served,
            cell: SlotCell {
                hlc: 0,
                domain: slot.domain.to_bits(),
                fault: 0,
                state,
            },
            program,
            wake_host: slot.wake_host,
            wake_senders: slot.wake_senders,
            links: Some(slot.links),
        });
        Ok(self.dispatch.thread().clone())
    }
}

/// A runtime on the wgpu backend, for programs that take a backend option
/// (the adapters' examples): without a WebGPU adapter it falls back to the
/// cpu backend and says why — unless `RINGKERNEL_REQUIRE_WGPU=1`, when
/// that is an error (CI, where Mesa's software driver must be found).
///
/// # Errors
/// No adapter under `RINGKERNEL_REQUIRE_WGPU=1`; a runtime that does not
/// start.
pub fn runtime_or_cpu() -> Result<ringkernel::runtime::Runtime, Box<dyn std::error::Error>> {
    use ringkernel::runtime::Runtime;
    match WgpuBackend::new() {
        Ok(backend) => {
            println!("wgpu adapter: {}", backend.device().adapter());
            Ok(Runtime::builder().device(backend).build()?)
        }
        Err(e) if std::env::var("RINGKERNEL_REQUIRE_WGPU").as_deref() == Ok("1") => {
            Err(format!("RINGKERNEL_REQUIRE_WGPU=1 and {e}").into())
        }
        Err(e) => {
            println!("the wgpu backend is not available here ({e}); using the cpu backend");
            Ok(Runtime::new()?)
        }
    }
}
