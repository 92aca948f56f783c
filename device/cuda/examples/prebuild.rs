//! Compiles the actor-host modules the GPU check needs (the conformance
//! kernels, and the bench's) with nvcc to cubins for sm_80 and sm_90, named
//! as the backend's module cache looks them up — so a GPU machine without
//! NVRTC runs them (`RINGKERNEL_CUDA_MODULES=<dir>`; see `.ci/gpu-check`).
//!
//! `cargo run -p ringkernel-cuda --example prebuild -- <dir>`; nvcc is
//! `$RINGKERNEL_NVCC` or `nvcc` on `PATH`.

use ringkernel::conformance::{Probe, Relay, Reverse, Wide};
use ringkernel::kernel::Kernel;
use ringkernel_cuda::{Arch, KernelSource, module_name, translation_unit};
use std::process::{Command, ExitCode};

fn source<K: Kernel>() -> KernelSource {
    KernelSource {
        name: K::NAME,
        handler: K::cuda().expect("a CUDA handler"),
    }
}

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: prebuild <dir>");
        return ExitCode::FAILURE;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("output directory");
    let nvcc = std::env::var("RINGKERNEL_NVCC").unwrap_or_else(|_| "nvcc".into());
    // The kernel sets registered by tests/gpu.rs and the bench report.
    let sets = [
        vec![
            source::<Probe>(),
            source::<Reverse>(),
            source::<Relay>(),
            source::<Wide>(),
        ],
        vec![source::<Probe>()],
        // The bench report's (`cuda_ask`, `cuda_k2k_forward`).
        vec![source::<Probe>(), source::<Relay>()],
    ];
    for kernels in &sets {
        let tu = translation_unit(Arch::Cuda, kernels);
        for arch in ["sm_80", "sm_90"] {
            let name = module_name(&tu, arch);
            let src = dir.join(format!("{name}.cu"));
            std::fs::write(&src, &tu).expect("write the source");
            let out = Command::new(&nvcc)
                .args(["-std=c++17", &format!("-arch={arch}"), "-cubin", "-o"])
                .arg(dir.join(format!("{name}.cubin")))
                .arg(&src)
                .status();
            match out {
                Ok(s) if s.success() => println!("{name}.cubin"),
                other => {
                    eprintln!("nvcc failed for {name}: {other:?}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
