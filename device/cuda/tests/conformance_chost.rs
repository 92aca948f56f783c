//! The backend conformance suite — the very list the cpu and wgpu backends
//! run — on the c-host backend: GPU actors whose handlers are CUDA C++,
//! served by the actor-host device loop (`kernels/rk_loop.cuh`) compiled
//! as host C++ and run on block threads, behind the ordinary runtime.

use ringkernel::conformance::{self, ChannelWaiter, Echo, Probe};
use ringkernel::kernel::BackendKind;
use ringkernel::runtime::{LaunchError, LaunchOptions, Runtime};
use ringkernel_cuda::CHostBackend;

fn runtime() -> Runtime {
    Runtime::builder()
        .device(CHostBackend::new())
        .build()
        .unwrap()
}

#[test]
fn the_conformance_suite_on_the_c_host_backend() {
    let rt = runtime();
    assert_eq!(rt.backend(), BackendKind::Cuda);
    for (name, check) in conformance::ALL {
        check(&rt);
        eprintln!("{name}: ok");
    }
}

/// A kernel with a cpu handler only.
struct CpuOnly;
impl ringkernel::kernel::Kernel for CpuOnly {
    type State = u64;
    const NAME: &'static str = "cpu-only";
    fn cpu_handlers() -> Option<ringkernel::kernel::CpuHandlers<Self>> {
        Some(
            ringkernel::kernel::CpuHandlers::new().on::<Echo>(|_, Echo(v), ctx| {
                ctx.reply(v);
                Ok(())
            }),
        )
    }
}

/// A kernel whose CUDA handler does not compile.
struct Broken;
impl ringkernel::kernel::Kernel for Broken {
    type State = u64;
    const NAME: &'static str = "broken";
    fn cuda() -> Option<ringkernel::backend::CudaHandler> {
        Some(ringkernel::backend::CudaHandler {
            source: "RK_DEVICE uint32_t rk_handle(void* s, const rk_envelope_header* m, \
                     const uint8_t* p, rk_reply* r, rk_later* l) { return undefined_thing; }",
            types: &[1],
            max_later: 0,
        })
    }
}

#[test]
fn what_the_c_host_backend_cannot_do_is_a_typed_error() {
    let rt = runtime();
    assert!(matches!(
        rt.launch::<CpuOnly, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}),
        Err(LaunchError::NoHandler {
            kernel: "cpu-only",
            backend: BackendKind::Cuda
        })
    ));
    match rt.launch::<Broken, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}) {
        Err(LaunchError::Backend {
            backend: BackendKind::Cuda,
            message,
        }) => assert!(
            message.contains("undefined_thing"),
            "the compiler's log names the error: {message}"
        ),
        other => panic!("expected a compile error, got {other:?}"),
    }
    // The runtime serves on after a failed launch.
    conformance::ask_round_trip(&rt);
    let _ = Probe;
}
