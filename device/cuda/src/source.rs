//! The translation unit: the protocol header, one architecture's
//! intrinsics, the handler ABI, every kernel's handler (each in its own
//! namespace), the dispatch table, the device loop and its entry point —
//! one text, compiled by NVRTC for a GPU, by nvcc in CI, and by the host
//! C++ compiler for the c-host backend.

use ringkernel::backend::CudaHandler;
use std::fmt::Write as _;

/// The device loop's sources, as compiled (also on disk in `kernels/`).
pub mod kernels {
    /// Intrinsics for CUDA (inline PTX).
    pub const ARCH_CUDA: &str = include_str!("../kernels/rk_arch_cuda.cuh");
    /// The same intrinsics for host C++ (`__atomic` builtins, host hooks).
    pub const ARCH_HOST: &str = include_str!("../kernels/rk_arch_host.h");
    /// The handler ABI and the slot descriptor.
    pub const DEVICE: &str = include_str!("../kernels/rk_device.cuh");
    /// The device loop.
    pub const LOOP: &str = include_str!("../kernels/rk_loop.cuh");
    /// The entry points.
    pub const ENTRY: &str = include_str!("../kernels/rk_actor_host.cuh");
    /// Every source file, by name: `(file, text)`.
    pub const ALL: &[(&str, &str)] = &[
        ("rk_arch_cuda.cuh", ARCH_CUDA),
        ("rk_arch_host.h", ARCH_HOST),
        ("rk_device.cuh", DEVICE),
        ("rk_loop.cuh", LOOP),
        ("rk_actor_host.cuh", ENTRY),
    ];
}

/// Which compiler the translation unit is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// NVRTC or nvcc: the `rk_actor_host` kernel.
    Cuda,
    /// Host C++: `rk_host_block_run`, for the c-host backend.
    Host,
}

/// One kernel type hosted by the actor-host loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// The kernel's name (comments and errors).
    pub name: &'static str,
    /// Its CUDA C++ handler.
    pub handler: CudaHandler,
}

/// How many later replies the loop keeps room for (the largest
/// `max_later`, at least one).
fn later_cap(kernels: &[KernelSource]) -> u32 {
    kernels
        .iter()
        .map(|k| k.handler.max_later)
        .max()
        .unwrap_or(0)
        .max(1)
}

/// Drops `#pragma once` (the pieces are concatenated into one file).
fn piece(out: &mut String, name: &str, text: &str) {
    let _ = writeln!(out, "\n// ---- {name} ----");
    for line in text.lines() {
        if line.trim() != "#pragma once" {
            out.push_str(line);
            out.push('\n');
        }
    }
}

/// The translation unit hosting `kernels` (kernel index = position).
pub fn translation_unit(arch: Arch, kernels: &[KernelSource]) -> String {
    let mut tu = String::new();
    piece(
        &mut tu,
        "ringkernel_protocol.h",
        &ringkernel::layout::c_header(),
    );
    match arch {
        Arch::Cuda => piece(&mut tu, "rk_arch_cuda.cuh", kernels::ARCH_CUDA),
        Arch::Host => piece(&mut tu, "rk_arch_host.h", kernels::ARCH_HOST),
    }
    piece(&mut tu, "rk_device.cuh", kernels::DEVICE);
    let _ = writeln!(tu, "\n// ---- handlers ----");
    for (i, k) in kernels.iter().enumerate() {
        let _ = writeln!(
            tu,
            "namespace rk_k{i} {{ // kernel `{}`\n{}\n}} // namespace rk_k{i}",
            k.name.replace(['\n', '\r'], " "),
            k.handler.source
        );
    }
    let _ = writeln!(tu, "\n#define RK_LATER_CAP {}u", later_cap(kernels));
    let _ = writeln!(
        tu,
        "RK_DEVICE uint32_t rk_max_later(uint32_t kernel) {{\n    switch (kernel) {{"
    );
    for (i, k) in kernels.iter().enumerate() {
        let _ = writeln!(
            tu,
            "    case {i}u: return {}u;",
            k.handler.max_later.min(later_cap(kernels))
        );
    }
    let _ = writeln!(tu, "    default: return 0u;\n    }}\n}}");
    let _ = writeln!(
        tu,
        "RK_DEVICE uint32_t rk_dispatch(uint32_t kernel, void* state, const rk_envelope_header* msg,\n\
         \x20                              const uint8_t* payload, rk_reply* reply, rk_later* later) {{\n\
         \x20   switch (kernel) {{"
    );
    for i in 0..kernels.len() {
        let _ = writeln!(
            tu,
            "    case {i}u: return rk_k{i}::rk_handle(state, msg, payload, reply, later);"
        );
    }
    let _ = writeln!(tu, "    default: return RK_PANIC;\n    }}\n}}");
    piece(&mut tu, "rk_loop.cuh", kernels::LOOP);
    piece(&mut tu, "rk_actor_host.cuh", kernels::ENTRY);
    tu
}

/// The file name (without extension) a compiled actor-host module of `tu`
/// for `arch` is cached under: `rk_actor_host-<FNV-1a of the text>-<arch>`.
/// [`CudaBackend`](crate::CudaBackend) loads `<name>.cubin` or `<name>.ptx`
/// from its module cache before compiling with NVRTC, so a GPU machine
/// without NVRTC can run modules built elsewhere (`examples/prebuild.rs`).
pub fn module_name(tu: &str, arch: &str) -> String {
    let hash = tu.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("rk_actor_host-{hash:016x}-{arch}")
}
