//! # ringkernel-wgpu — the WebGPU backend's device side
//!
//! WebGPU has no persistent kernels, and a running dispatch never sees host
//! writes, so this backend emulates a persistent kernel with a host-driven
//! loop: the host drains each actor slot's pending H2K envelopes into a
//! batch, one dispatch serves every slot's batch — **one invocation per
//! actor slot, looping over its batch in order** — and the host reads back
//! the replies, the slots' state and their control words.
//!
//! This crate holds that device side: the protocol mirrored in WGSL
//! (`shaders/protocol.wgsl`, checked against the Rust layout by naga
//! reflection), the loop (`shaders/loop.wgsl`), a kernel's WGSL handler
//! ([`WgslKernel`]), its compilation ([`WgpuDevice::compile`], validated by
//! naga first so a bad handler is a typed error with naga's message) and
//! one dispatch ([`WgpuDevice::dispatch`]). Every device operation runs
//! inside error scopes (wgpu's default handler panics). The loop reports how
//! many messages each slot processed and the host checks the count: Mesa's
//! software driver is known to stop long loops silently, so a short count is
//! an error ([`WgpuError::LoopCut`]), never a silent loss; batches are capped
//! at [`MAX_BATCH`].
//!
//! Wiring this into the runtime (the dispatch thread, H2K drain and K2H
//! publication, adaptive batches, two dispatches in flight) is the next
//! step; nothing here is reachable from the adapters yet.

mod backend;
mod host_loop;
pub use backend::{WgpuBackend, runtime_or_cpu};
pub use host_loop::{
    COMMIT_REFUSED, DEVICE_FAILED, DispatchLoop, DispatchStats, K2H_OVERRUN, LoopSlot,
};

use ringkernel::envelope::HEADER_SIZE;
use ringkernel::kernel::MAX_INLINE;
use std::borrow::Cow;

/// The protocol in WGSL: the envelope as 32-bit words, 64-bit helpers, HLC.
pub const PROTOCOL_WGSL: &str = include_str!("../shaders/protocol.wgsl");
/// The device loop of one dispatch.
pub const LOOP_WGSL: &str = include_str!("../shaders/loop.wgsl");
/// The loop for kernels of declared width > 1 (a workgroup per slot).
pub const LOOP_WIDE_WGSL: &str = include_str!("../shaders/loop_wide.wgsl");
/// What both loops share: output types, bindings, `rk_emit`.
pub const EMIT_WGSL: &str = include_str!("../shaders/emit.wgsl");

/// The widest handler the wgpu backend runs: WebGPU's default limit of
/// invocations per workgroup.
pub const MAX_WIDTH: u32 = 256;

/// Bytes of one envelope slot (header + inline payload), as in the rings.
pub const SLOT_BYTES: usize = HEADER_SIZE + MAX_INLINE;

/// The most messages one slot serves in one dispatch (the longest loop
/// Mesa's software driver is known to run to the end).
pub const MAX_BATCH: usize = 65_535;

/// Offsets in a slot cell (`SlotCell` in `loop.wgsl`, checked against
/// naga's layout by the tests): the HLC word.
pub const CELL_HLC: usize = 0;
/// Offset of the messages processed by the dispatch.
pub const CELL_PROCESSED: usize = 8;
/// Offset of the fault status.
pub const CELL_FAULT: usize = 12;
/// Offset of the clock domain.
pub const CELL_DOMAIN: usize = 16;
/// Offset of the state words.
pub const CELL_STATE: usize = 20;

/// A handler status at or above this is a fault (`status - RK_FAULT` is
/// the kernel's own code).
pub const RK_FAULT: u32 = 0x100;

/// The handler status of a deferred ask (a later run answers it).
pub const RK_DEFERRED: u32 = 2;

/// The handler status of an abort: the slot faults with `HandlerPanic`.
pub const RK_PANIC: u32 = u32::MAX;

/// The loop's status for a reply longer than the 64 inline bytes: the slot
/// faults (`HandlerFault`, detail [`REPLY_TOO_LARGE`]) rather than truncate.
pub const RK_REPLY_TOO_LARGE: u32 = u32::MAX - 1;

/// The `HandlerFault` detail of a reply longer than a slot holds.
pub const REPLY_TOO_LARGE: u64 = 0x3_0000_0000;

/// What went wrong on the wgpu backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WgpuError {
    /// No WebGPU adapter on this machine (no GPU and no software driver).
    #[error("no WebGPU adapter: {0}")]
    NoAdapter(String),
    /// The adapter would not open a device.
    #[error("the WebGPU device could not be opened: {0}")]
    Device(String),
    /// The kernel's WGSL does not compile or validate.
    #[error("kernel {kernel}: its WGSL does not compile: {message}")]
    Shader {
        /// The kernel.
        kernel: &'static str,
        /// naga's (or the driver's) message.
        message: String,
    },
    /// A slot's batch is larger than one dispatch serves.
    #[error("a batch of {count} messages exceeds the {max} one dispatch serves")]
    BatchTooLarge {
        /// Messages offered.
        count: usize,
        /// [`MAX_BATCH`].
        max: usize,
    },
    /// A slot's state is not the kernel's declared size.
    #[error("state of {got} words for a kernel that declares {want}")]
    StateSize {
        /// Words offered.
        got: usize,
        /// Words declared.
        want: usize,
    },
    /// The loop processed fewer messages than it was given and reported no
    /// fault: the driver cut it short.
    #[error("slot {slot}: the loop processed {processed} of {count} messages")]
    LoopCut {
        /// The slot.
        slot: usize,
        /// Processed.
        processed: usize,
        /// Given.
        count: usize,
    },
    /// A device operation failed (validation, out of memory, device lost).
    #[error("device operation failed: {0}")]
    Operation(String),
}

/// A kernel's handler in WGSL, with the fixed signature
///
/// ```text
/// fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>,
///              msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32
/// ```
///
/// returning `RK_DONE`, `RK_REPLIED` (with `reply` filled: `len` in bytes,
/// `payload` words) or `RK_FAULT + code`. The state is `state_words` 32-bit
/// words, kept between messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgslKernel {
    /// The kernel's name (in errors).
    pub name: &'static str,
    /// Its state, in 32-bit words (at least 1).
    pub state_words: u32,
    /// The WGSL source of `rk_handle` (and any helpers it uses).
    pub handler: &'static str,
    /// The most replies to deferred asks (and sends) one run may make.
    pub max_later: u32,
    /// Invocations per slot: 1 runs the handler above on one invocation;
    /// more (up to [`MAX_WIDTH`]) runs the workgroup form (see
    /// `shaders/loop_wide.wgsl`: `rk_handle(lid, msg, reply, later)`, the
    /// state in `rk_state`).
    pub width: u32,
}

impl WgslKernel {
    /// The whole shader: protocol, state size, handler, loop.
    pub fn source(&self) -> String {
        let width = self.width.max(1);
        format!(
            "{PROTOCOL_WGSL}\nconst RK_STATE_WORDS: u32 = {}u;\nconst RK_MAX_LATER: u32 = {}u;\nconst RK_LATER_SLOTS: u32 = {}u;\nconst RK_WIDTH: u32 = {width}u;\n{}\n{EMIT_WGSL}\n{}",
            self.state_words.max(1),
            self.max_later,
            self.max_later.max(1),
            self.handler,
            if width > 1 { LOOP_WIDE_WGSL } else { LOOP_WGSL },
        )
    }

    /// Parses and validates the shader with naga.
    ///
    /// # Errors
    /// [`WgpuError::Shader`] with naga's message.
    pub fn validate(&self) -> Result<naga::Module, WgpuError> {
        let source = self.source();
        let module = naga::front::wgsl::parse_str(&source).map_err(|e| WgpuError::Shader {
            kernel: self.name,
            message: e.emit_to_string(&source),
        })?;
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default(),
        )
        .validate(&module)
        .map_err(|e| WgpuError::Shader {
            kernel: self.name,
            message: e.emit_to_string(&source),
        })?;
        Ok(module)
    }

    fn cell_bytes(&self) -> usize {
        // The struct aligns to 8 (its vec2<u32>).
        (CELL_STATE + 4 * self.state_words.max(1) as usize).next_multiple_of(8)
    }
}

/// A WebGPU device (a real GPU, or a software driver such as lavapipe).
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
}

impl std::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuDevice")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

/// A kernel compiled for a device: its pipeline.
#[derive(Debug)]
pub struct Program {
    kernel: WgslKernel,
    pipeline: wgpu::ComputePipeline,
}

impl Program {
    /// The kernel it was compiled from.
    pub fn kernel(&self) -> &WgslKernel {
        &self.kernel
    }
}

/// A dispatch submitted and not read back yet ([`WgpuDevice::submit`]).
pub struct Pending {
    submission: wgpu::SubmissionIndex,
    outbox_read: wgpu::Buffer,
    cells_read: wgpu::Buffer,
    /// Kept: a later dispatch may chain its slots' cells from it.
    cells_buf: wgpu::Buffer,
    rx: std::sync::mpsc::Receiver<Result<(), wgpu::BufferAsyncError>>,
    lens: Vec<usize>,
    slots: usize,
    outs: usize,
    cell_bytes: usize,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("slots", &self.slots)
            .field("messages", &self.lens)
            .finish_non_exhaustive()
    }
}

/// One actor slot's part of a dispatch: what persists between dispatches
/// (the host keeps it), and its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotCell {
    /// The slot's HLC word.
    pub hlc: u64,
    /// The slot's clock domain (stamps its replies).
    pub domain: u32,
    /// 0, or the handler status that faulted the slot (it serves no more).
    pub fault: u32,
    /// The kernel's state words.
    pub state: Vec<u32>,
}

/// What a dispatch did for one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotOutcome {
    /// Messages processed (all of the batch, unless the slot faulted).
    pub processed: usize,
    /// Per processed message, what its run made.
    pub messages: Vec<MessageOut>,
}

/// What one handler run made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageOut {
    /// Its reply envelope (`None`: no reply now).
    pub reply: Option<[u8; SLOT_BYTES]>,
    /// The handler deferred the ask: a later run answers it.
    pub deferred: bool,
    /// Replies to asks deferred earlier, in the order made.
    pub later: Vec<[u8; SLOT_BYTES]>,
}

impl WgpuDevice {
    /// Opens the first adapter wgpu finds.
    ///
    /// # Errors
    /// [`WgpuError::NoAdapter`], [`WgpuError::Device`].
    pub fn new() -> Result<Self, WgpuError> {
        pollster::block_on(Self::open())
    }

    async fn open() -> Result<Self, WgpuError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions::default())
            .await
            .map_err(|e| WgpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ringkernel"),
                ..Default::default()
            })
            .await
            .map_err(|e| WgpuError::Device(e.to_string()))?;
        Ok(WgpuDevice {
            device,
            queue,
            info,
        })
    }

    /// Destroys the device, as a device loss would: every later dispatch
    /// fails (`WgpuError::Operation`), and the dispatch loop faults every
    /// slot in it with `DeviceError` (detail `DEVICE_FAILED`), so every
    /// caller resolves. For tests of device loss, and to give a device up
    /// early.
    pub fn destroy(&self) {
        self.device.destroy();
    }

    /// The adapter's name and backend.
    pub fn adapter(&self) -> String {
        format!("{} ({:?})", self.info.name, self.info.backend)
    }

    /// Compiles a kernel: naga validates it first (a typed error with its
    /// message), then the driver builds the pipeline inside an error scope.
    ///
    /// # Errors
    /// [`WgpuError::Shader`].
    pub fn compile(&self, kernel: &WgslKernel) -> Result<Program, WgpuError> {
        kernel.validate()?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel.name),
                source: wgpu::ShaderSource::Wgsl(Cow::Owned(kernel.source())),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.name),
                layout: None,
                module: &module,
                entry_point: Some("rk_main"),
                compilation_options: Default::default(),
                cache: None,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(WgpuError::Shader {
                kernel: kernel.name,
                message: e.to_string(),
            });
        }
        Ok(Program {
            kernel: *kernel,
            pipeline,
        })
    }

    /// One dispatch: each slot serves its batch (envelopes in ring-slot
    /// form) in order with `program`'s handler, at physical time `pt_ns`.
    /// The cells are updated in place.
    ///
    /// # Errors
    /// [`WgpuError::BatchTooLarge`], [`WgpuError::StateSize`],
    /// [`WgpuError::LoopCut`], [`WgpuError::Operation`].
    pub fn dispatch(
        &self,
        program: &Program,
        pt_ns: u64,
        cells: &mut [SlotCell],
        batches: &[&[[u8; SLOT_BYTES]]],
    ) -> Result<Vec<SlotOutcome>, WgpuError> {
        if cells.is_empty() || batches.is_empty() {
            return Ok(Vec::new());
        }
        let chain = vec![None; cells.len()];
        let pending = self.submit_limited(program, pt_ns, cells, batches, &chain, MAX_BATCH)?;
        self.wait(pending, cells)
    }

    /// Submits a dispatch and returns without waiting for it: its results
    /// come from [`WgpuDevice::wait`]. `chain[i] = Some((earlier, j))` takes
    /// slot `i`'s cell (state, clock, fault) from slot `j` of an `earlier`
    /// dispatch still in flight, on the device, after it ran — so a slot
    /// can have two dispatches in flight, the second serving the messages
    /// after the first's; `None` takes `cells[i]`.
    ///
    /// # Errors
    /// As [`WgpuDevice::dispatch`], but for `LoopCut` (found by `wait`).
    pub fn submit(
        &self,
        program: &Program,
        pt_ns: u64,
        cells: &[SlotCell],
        batches: &[&[[u8; SLOT_BYTES]]],
        chain: &[Option<(&Pending, usize)>],
    ) -> Result<Pending, WgpuError> {
        self.submit_limited(program, pt_ns, cells, batches, chain, MAX_BATCH)
    }

    fn submit_limited(
        &self,
        program: &Program,
        pt_ns: u64,
        cells: &[SlotCell],
        batches: &[&[[u8; SLOT_BYTES]]],
        chain: &[Option<(&Pending, usize)>],
        max_batch: usize,
    ) -> Result<Pending, WgpuError> {
        let kernel = &program.kernel;
        let words = kernel.state_words.max(1) as usize;
        for (cell, batch) in cells.iter().zip(batches) {
            if batch.len() > max_batch {
                return Err(WgpuError::BatchTooLarge {
                    count: batch.len(),
                    max: max_batch,
                });
            }
            if cell.state.len() != words {
                return Err(WgpuError::StateSize {
                    got: cell.state.len(),
                    want: words,
                });
            }
        }
        let slots = cells.len().min(batches.len());
        if slots == 0 {
            return Err(WgpuError::Operation("a dispatch of no slots".into()));
        }
        let total: usize = batches[..slots].iter().map(|b| b.len()).sum();

        // Inputs.
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(&pt_ns.to_le_bytes());
        header.extend_from_slice(&(slots as u32).to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut ranges = Vec::with_capacity(8 * slots);
        let mut inbox = Vec::with_capacity(SLOT_BYTES * total.max(1));
        let mut first = 0u32;
        for b in &batches[..slots] {
            ranges.extend_from_slice(&first.to_le_bytes());
            ranges.extend_from_slice(&(b.len() as u32).to_le_bytes());
            for m in *b {
                inbox.extend_from_slice(m);
            }
            first += b.len() as u32;
        }
        if inbox.is_empty() {
            inbox.resize(SLOT_BYTES, 0);
        }
        let cell_bytes = kernel.cell_bytes();
        let mut cell_data = vec![0u8; cell_bytes * slots];
        for (c, out) in cells[..slots].iter().zip(cell_data.chunks_mut(cell_bytes)) {
            out[CELL_HLC..CELL_HLC + 8].copy_from_slice(&c.hlc.to_le_bytes());
            out[CELL_FAULT..CELL_FAULT + 4].copy_from_slice(&c.fault.to_le_bytes());
            out[CELL_DOMAIN..CELL_DOMAIN + 4].copy_from_slice(&c.domain.to_le_bytes());
            for (w, s) in out[CELL_STATE..].chunks_mut(4).zip(&c.state) {
                w.copy_from_slice(&s.to_le_bytes());
            }
        }

        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        use wgpu::BufferUsages as U;
        // Created unmapped and filled through the queue: `create_buffer_init`
        // maps at creation and panics on a lost device.
        let init = |label, contents: &[u8], usage: U| {
            let size = (contents.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(wgpu::COPY_BUFFER_ALIGNMENT),
                usage: usage | U::COPY_DST,
                mapped_at_creation: false,
            });
            self.queue.write_buffer(&buffer, 0, contents);
            buffer
        };
        let dispatch_buf = init("rk-dispatch", &header, U::UNIFORM);
        let ranges_buf = init("rk-batches", &ranges, U::STORAGE);
        let inbox_buf = init("rk-inbox", &inbox, U::STORAGE);
        let cells_buf = init("rk-cells", &cell_data, U::STORAGE | U::COPY_SRC);
        let outs = 1 + kernel.max_later as usize;
        let outbox_len = inbox.len() * outs;
        let outbox_buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("rk-outbox"),
            size: outbox_len as u64,
            usage: U::STORAGE | U::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = |label, size: usize| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size as u64,
                usage: U::MAP_READ | U::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let outbox_read = read("rk-outbox-read", outbox_len);
        let cells_read = read("rk-cells-read", cell_data.len());
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("rk-bind"),
            layout: &program.pipeline.get_bind_group_layout(0),
            entries: &[
                entry(0, &dispatch_buf),
                entry(1, &ranges_buf),
                entry(2, &inbox_buf),
                entry(3, &outbox_buf),
                entry(4, &cells_buf),
            ],
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rk") });
        // Cells chained from a dispatch in flight: copied on the device,
        // after it ran (queue order), over what was uploaded for them.
        for (i, link) in chain.iter().enumerate().take(slots) {
            if let Some((earlier, j)) = link {
                if earlier.cell_bytes != cell_bytes || *j >= earlier.slots {
                    return Err(WgpuError::Operation(
                        "a chained cell from another kernel or slot range".into(),
                    ));
                }
                encoder.copy_buffer_to_buffer(
                    &earlier.cells_buf,
                    (j * cell_bytes) as u64,
                    &cells_buf,
                    (i * cell_bytes) as u64,
                    cell_bytes as u64,
                );
            }
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("rk-loop"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&program.pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(slots as u32, 1, 1);
        }
        encoder.copy_buffer_to_buffer(&outbox_buf, 0, &outbox_read, 0, outbox_len as u64);
        encoder.copy_buffer_to_buffer(&cells_buf, 0, &cells_read, 0, cell_data.len() as u64);
        let submission = self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        for b in [&outbox_read, &cells_read] {
            let tx = tx.clone();
            b.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        }
        let errors = [
            pollster::block_on(memory.pop()),
            pollster::block_on(validation.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(WgpuError::Operation(e.to_string()));
        }
        Ok(Pending {
            submission,
            outbox_read,
            cells_read,
            cells_buf,
            rx,
            lens: batches[..slots].iter().map(|b| b.len()).collect(),
            slots,
            outs,
            cell_bytes,
        })
    }

    /// Waits for a submitted dispatch (only it, not later ones) and reads
    /// back what it did; `cells` (the dispatch's, in order) are updated.
    ///
    /// # Errors
    /// [`WgpuError::LoopCut`], [`WgpuError::Operation`].
    pub fn wait(
        &self,
        pending: Pending,
        cells: &mut [SlotCell],
    ) -> Result<Vec<SlotOutcome>, WgpuError> {
        let Pending {
            submission,
            outbox_read,
            cells_read,
            rx,
            lens,
            slots,
            outs,
            cell_bytes,
            ..
        } = pending;
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .map_err(|e| WgpuError::Operation(e.to_string()))?;
        for _ in 0..2 {
            rx.recv()
                .map_err(|e| WgpuError::Operation(e.to_string()))?
                .map_err(|e| WgpuError::Operation(e.to_string()))?;
        }
        let mapped = |b: &wgpu::Buffer| {
            b.slice(..)
                .get_mapped_range()
                .map(|v| v.to_vec())
                .map_err(|e| WgpuError::Operation(e.to_string()))
        };
        let out = mapped(&outbox_read)?;
        let cell_out = mapped(&cells_read)?;

        let mut outcomes = Vec::with_capacity(slots);
        let mut first = 0usize;
        for (slot, ((c, bytes), &len)) in cells[..slots]
            .iter_mut()
            .zip(cell_out.chunks(cell_bytes))
            .zip(&lens)
            .enumerate()
        {
            let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            c.hlc = u64::from(word(CELL_HLC)) | u64::from(word(CELL_HLC + 4)) << 32;
            let processed = word(CELL_PROCESSED) as usize;
            c.fault = word(CELL_FAULT);
            for (i, s) in c.state.iter_mut().enumerate() {
                *s = word(CELL_STATE + 4 * i);
            }
            if processed > len || (c.fault == 0 && processed != len) {
                return Err(WgpuError::LoopCut {
                    slot,
                    processed,
                    count: len,
                });
            }
            let env = |at: usize| -> [u8; SLOT_BYTES] {
                out[at * SLOT_BYTES..(at + 1) * SLOT_BYTES]
                    .try_into()
                    .unwrap()
            };
            // type_id 0: no envelope in that place.
            let made = |e: &[u8; SLOT_BYTES]| e[4..8] != [0; 4];
            let messages = (0..processed)
                .map(|i| {
                    let base = (first + i) * outs;
                    let reply = env(base);
                    MessageOut {
                        // With no reply, `seq` holds the handler's status.
                        deferred: !made(&reply) && reply[48..52] == RK_DEFERRED.to_le_bytes(),
                        reply: made(&reply).then_some(reply),
                        later: (1..outs).map(|k| env(base + k)).take_while(made).collect(),
                    }
                })
                .collect();
            outcomes.push(SlotOutcome {
                processed,
                messages,
            });
            first += len;
        }
        Ok(outcomes)
    }
}

fn entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past [`MAX_BATCH`] a driver may stop the loop early (Mesa's lavapipe
    /// does, at 65 535 iterations): the count check turns that into
    /// `LoopCut`, never a short result passed off as whole.
    #[test]
    fn a_loop_the_driver_cuts_short_is_caught() {
        let Ok(dev) = WgpuDevice::new() else {
            eprintln!("skipped: no WebGPU adapter");
            return;
        };
        let count = WgslKernel {
            name: "count",
            state_words: 1,
            handler: "fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 { (*state)[0] = (*state)[0] + 1u; return RK_DONE; }",
            max_later: 0,
            width: 1,
        };
        let program = dev.compile(&count).unwrap();
        let n = 100_000;
        let batch = vec![[0u8; SLOT_BYTES]; n];
        let mut cells = [SlotCell {
            hlc: 0,
            domain: 0,
            fault: 0,
            state: vec![0],
        }];
        let chain = [None];
        let result = dev
            .submit_limited(&program, 1, &cells, &[&batch], &chain, n)
            .and_then(|p| dev.wait(p, &mut cells));
        match result {
            Ok(out) => {
                assert_eq!(out[0].processed, n);
                assert_eq!(cells[0].state, [n as u32]);
                eprintln!("{}: runs loops of {n} to the end", dev.adapter());
            }
            Err(WgpuError::LoopCut {
                processed, count, ..
            }) => {
                assert_eq!(count, n);
                assert_eq!(cells[0].state, [processed as u32]);
                eprintln!("{}: cut a loop of {n} at {processed}", dev.adapter());
            }
            Err(e) => panic!("{e}"),
        }
    }
}
