//! The cuda backend on a GPU: the conformance suite through the runtime,
//! served by the persistent actor-host kernel. Without a driver or device
//! it skips with the reason — or fails, under `RINGKERNEL_REQUIRE_CUDA=1`
//! (the GPU check: `docs/BENCHMARKS.md`, *GPU check*). Without a driver, the
//! backend's refusal is itself checked: a typed error, no panic.

use ringkernel::conformance::{self, Probe, Relay, Reverse, Wide};
use ringkernel::runtime::Runtime;
use ringkernel_cuda::{CudaBackend, CudaError};

fn required() -> bool {
    std::env::var("RINGKERNEL_REQUIRE_CUDA").as_deref() == Ok("1")
}

#[test]
fn without_a_driver_the_backend_is_a_typed_error() {
    match ringkernel_cuda::probe() {
        Err(CudaError::NoDriver { tried }) => {
            assert!(tried.contains("libcuda"), "{tried}");
            let built = CudaBackend::builder().kernel::<Probe>().unwrap().build();
            assert!(
                matches!(built, Err(CudaError::NoDriver { .. })),
                "{built:?}"
            );
        }
        Err(e) => eprintln!("a driver is present ({e}); nothing to check here"),
        Ok(info) => eprintln!("a device is present ({info:?}); nothing to check here"),
    }
}

#[test]
fn the_conformance_suite_on_the_gpu() {
    let info = match ringkernel_cuda::probe() {
        Ok(info) => info,
        Err(e) => {
            assert!(!required(), "RINGKERNEL_REQUIRE_CUDA=1 and {e}");
            eprintln!("skipped: {e}");
            return;
        }
    };
    eprintln!("device: {info:?}");
    let backend = CudaBackend::builder()
        .kernel::<Probe>()
        .unwrap()
        .kernel::<Reverse>()
        .unwrap()
        .kernel::<Relay>()
        .unwrap()
        .kernel::<Wide>()
        .unwrap()
        .build()
        .unwrap_or_else(|e| panic!("the cuda backend does not start: {e}"));
    eprintln!("actor-host kernel: {} blocks", backend.blocks());
    let rt = Runtime::builder().device(backend).build().unwrap();
    for (name, check) in conformance::ALL {
        check(&rt);
        eprintln!("{name}: ok");
    }
}
