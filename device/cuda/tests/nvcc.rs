//! Every CUDA source compiled by nvcc for sm_80 and sm_90 (PTX and cubin),
//! and by NVRTC (the backend's own run-time path), without a GPU: CI
//! installs nvcc and NVRTC from PyPI (`nvidia-cuda-nvcc` and friends, see
//! `.ci/run`). The PTX must contain the system-scope acquire/release
//! operations the protocol needs, and ptxas must report no spills.
//!
//! nvcc is `$RINGKERNEL_NVCC` or `nvcc` on `PATH`; NVRTC is found by the
//! dynamic loader (`LD_LIBRARY_PATH`). Without them the tests skip with the
//! reason — or fail, under `RINGKERNEL_REQUIRE_NVCC=1` (as in CI).

use ringkernel::backend::DeviceCode;
use ringkernel::conformance::{Probe, Relay, Reverse, Wide};
use ringkernel_cuda::{Arch, CudaError, KernelSource, kernels, translation_unit};
use std::path::PathBuf;
use std::process::Command;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

fn required() -> bool {
    std::env::var("RINGKERNEL_REQUIRE_NVCC").as_deref() == Ok("1")
}

fn skip(why: &str) {
    assert!(!required(), "RINGKERNEL_REQUIRE_NVCC=1 and {why}");
    eprintln!("skipped: {why} (pip install nvidia-cuda-nvcc nvidia-cuda-nvrtc, see .ci/run)");
}

fn nvcc() -> Option<String> {
    let nvcc = std::env::var("RINGKERNEL_NVCC").unwrap_or_else(|_| "nvcc".into());
    match Command::new(&nvcc).arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout);
            eprintln!("{}", v.lines().last().unwrap_or_default());
            Some(nvcc)
        }
        _ => {
            skip(&format!("no nvcc (`{nvcc}`)"));
            None
        }
    }
}

/// The actor-host translation unit for the conformance kernels.
fn conformance_tu() -> String {
    let cuda = |code: DeviceCode| code.cuda.expect("a CUDA handler");
    translation_unit(
        Arch::Cuda,
        &[
            KernelSource {
                name: "probe",
                handler: cuda(DeviceCode::of::<Probe>()),
            },
            KernelSource {
                name: "reverse",
                handler: cuda(DeviceCode::of::<Reverse>()),
            },
            KernelSource {
                name: "relay",
                handler: cuda(DeviceCode::of::<Relay>()),
            },
            KernelSource {
                name: "wide",
                handler: cuda(DeviceCode::of::<Wide>()),
            },
        ],
    )
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nvcc");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The protocol operations the device side must use (docs/protocol.md).
const MUST_CONTAIN: &[&str] = &[
    "ld.acquire.sys",
    "st.release.sys",
    "atom.release.sys.cas.b64",
    "fence.sc.sys",
    "%globaltimer",
    "nanosleep",
    ".entry rk_actor_host",
    // The block's barriers (not the `.aligned` form of __syncthreads():
    // thread 0 and the others wait at different places).
    "barrier.sync 0;",
    "barrier.sync 1,",
];

#[test]
fn every_source_file_is_in_the_translation_unit() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".cuh") || name.ends_with(".cu") || name.ends_with(".h") {
            assert!(
                kernels::ALL.iter().any(|(f, _)| *f == name),
                "kernels/{name} is not compiled (add it to kernels::ALL)"
            );
        }
    }
    let tu = translation_unit(Arch::Cuda, &[]);
    for (name, text) in kernels::ALL {
        if *name == "rk_arch_host.h" {
            assert!(!tu.contains("RK_ARCH_HOST 1"));
            assert!(translation_unit(Arch::Host, &[]).contains("RK_ARCH_HOST 1"));
            continue;
        }
        let body = text
            .lines()
            .find(|l| l.starts_with("RK_DEVICE") || l.starts_with("#define"));
        assert!(
            body.is_none_or(|l| tu.contains(l)),
            "{name} is in the CUDA translation unit"
        );
    }
}

#[test]
fn nvcc_compiles_the_actor_host_kernel_for_sm80_and_sm90() {
    let Some(nvcc) = nvcc() else { return };
    let dir = out_dir();
    let src = dir.join("rk_actor_host_conformance.cu");
    std::fs::write(&src, conformance_tu()).unwrap();
    for arch in ARCHS {
        let ptx = dir.join(format!("rk_actor_host.{arch}.ptx"));
        let cubin = dir.join(format!("rk_actor_host.{arch}.cubin"));
        let out = Command::new(&nvcc)
            .args(["-std=c++17", &format!("-arch={arch}"), "-ptx", "-o"])
            .arg(&ptx)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nvcc -ptx {arch}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&ptx).unwrap();
        for op in MUST_CONTAIN {
            assert!(text.contains(op), "{arch} PTX lacks `{op}`");
        }
        let out = Command::new(&nvcc)
            .args([
                "-std=c++17",
                &format!("-arch={arch}"),
                "-cubin",
                "-Xptxas",
                "-v",
                "-o",
            ])
            .arg(&cubin)
            .arg(&src)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nvcc -cubin {arch}:\n{log}");
        eprintln!("{arch}:\n{log}");
        let spills: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("spill") && !l.contains("0 bytes spill stores, 0 bytes spill loads")
            })
            .collect();
        assert!(
            spills.is_empty(),
            "{arch}: ptxas reports spills: {spills:?}"
        );
        assert!(std::fs::metadata(&cubin).unwrap().len() > 0);
    }
}

#[test]
fn nvrtc_compiles_the_conformance_handlers_with_the_loop() {
    match ringkernel_cuda::nvrtc_version() {
        Ok((major, minor)) => eprintln!("NVRTC {major}.{minor}"),
        Err(e) => return skip(&e.to_string()),
    }
    for arch in ARCHS {
        let ptx = ringkernel_cuda::compile_ptx(&conformance_tu(), arch)
            .unwrap_or_else(|e| panic!("NVRTC {arch}: {e}"));
        for op in MUST_CONTAIN {
            assert!(ptx.contains(op), "NVRTC {arch} PTX lacks `{op}`");
        }
    }
}

#[test]
fn an_nvrtc_compile_error_is_typed_and_carries_the_log() {
    if let Err(e) = ringkernel_cuda::nvrtc_version() {
        return skip(&e.to_string());
    }
    let bad = one_handler(
        "broken",
        "RK_DEVICE uint32_t rk_handle(void* s, const rk_envelope_header* m, \
         const uint8_t* p, rk_reply* r, rk_later* l) { return undefined_thing; }",
    );
    match ringkernel_cuda::compile_ptx(&bad, "sm_90") {
        Err(CudaError::Compile { log }) => assert!(log.contains("undefined_thing"), "{log}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn nvrtc_makes_cubins_for_sm80_and_sm90() {
    if let Err(e) = ringkernel_cuda::nvrtc_version() {
        return skip(&e.to_string());
    }
    for arch in ARCHS {
        let cubin = ringkernel_cuda::compile_cubin(&conformance_tu(), arch)
            .unwrap_or_else(|e| panic!("NVRTC cubin {arch}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: a cubin is an ELF image");
    }
}

/// A handler's helper needs no `__device__`: NVRTC compiles device code by
/// default (`--device-as-default-execution-space`).
#[test]
fn a_handler_helper_needs_no_device_annotation() {
    if let Err(e) = ringkernel_cuda::nvrtc_version() {
        return skip(&e.to_string());
    }
    let tu = one_handler(
        "helper",
        "static uint64_t twice(uint64_t v) { return 2 * v; }\n\
         RK_DEVICE uint32_t rk_handle(void* s, const rk_envelope_header* m, \
         const uint8_t* p, rk_reply* r, rk_later* l) { \
         return rk_reply_u64(r, twice(rk_get_u64(p, 0))); }",
    );
    for arch in ARCHS {
        ringkernel_cuda::compile_ptx(&tu, arch).unwrap_or_else(|e| panic!("NVRTC {arch}: {e}"));
    }
}

/// The CUDA translation unit of one kernel with handler `source` (type 1).
fn one_handler(name: &'static str, source: &'static str) -> String {
    translation_unit(
        Arch::Cuda,
        &[KernelSource {
            name,
            handler: ringkernel::backend::CudaHandler {
                source,
                types: &[1],
                max_later: 0,
            },
        }],
    )
}
