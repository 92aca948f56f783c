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

/// The same suite with every fence preceded by a stop the loop must
/// acknowledge (the cuda backend's protocol where host and device atomics
/// are not atomic with each other).
#[test]
fn the_conformance_suite_with_quiescing_fences() {
    let rt = Runtime::builder()
        .device(CHostBackend::quiescing())
        .build()
        .unwrap();
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
    assert!(matches!(
        rt.launch::<Greedy, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}),
        Err(LaunchError::TooManyLater {
            max_later: 1000,
            ..
        })
    ));
    // The runtime serves on after a failed launch.
    conformance::ask_round_trip(&rt);
}

/// A kernel that declares more later replies per run than K2H can take.
struct Greedy;
impl ringkernel::kernel::Kernel for Greedy {
    type State = u64;
    const NAME: &'static str = "greedy";
    fn cuda() -> Option<ringkernel::backend::CudaHandler> {
        Some(ringkernel::backend::CudaHandler {
            max_later: 1000,
            ..Probe::cuda().unwrap()
        })
    }
}

fn echo(slot: &mut ringkernel::runtime::GpuSlot<ChannelWaiter>, v: u64) -> u64 {
    conformance::ask(slot, Echo(v))
        .wait()
        .unwrap()
        .decode::<u64>()
        .unwrap()
}

#[test]
fn a_terminated_actors_block_serves_the_next_launch() {
    let backend = CHostBackend::new();
    let rt = Runtime::builder().device(backend.clone()).build().unwrap();
    for round in 0..5u64 {
        let mut slot = rt
            .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
            .unwrap();
        assert_eq!(echo(&mut slot, round), round);
        assert!(slot.terminate(conformance::DEADLINE).acknowledged);
        // The block goes dormant just after the acknowledgement.
        let deadline = std::time::Instant::now() + conformance::DEADLINE;
        while backend.dormant_blocks() < 1 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(backend.dormant_blocks(), 1);
    }
    assert_eq!(backend.blocks(), 1, "one block served all five actors");
}

#[test]
fn concurrent_launches_each_get_their_own_block() {
    let backend = CHostBackend::new();
    let rt = Runtime::builder().device(backend.clone()).build().unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let rt = &rt;
            s.spawn(move || {
                let mut slots: Vec<_> = (0..4)
                    .map(|_| {
                        rt.launch::<Probe, ChannelWaiter>(
                            Default::default(),
                            &LaunchOptions::default(),
                            |_| {},
                        )
                        .unwrap()
                    })
                    .collect();
                for round in 0..100u64 {
                    for (i, slot) in slots.iter_mut().enumerate() {
                        let v = t * 1_000_000 + i as u64 * 1000 + round;
                        assert_eq!(echo(slot, v), v);
                    }
                }
            });
        }
    });
    assert_eq!(backend.blocks(), 16);
}

/// The `Wide` conformance kernel at another declared width.
struct WideAt<const W: u32>;
impl<const W: u32> ringkernel::kernel::Kernel for WideAt<W> {
    type State = u32;
    const NAME: &'static str = "wide-at";
    const WIDTH: ringkernel::kernel::Width = ringkernel::kernel::Width::Block(W);
    fn cuda() -> Option<ringkernel::backend::CudaHandler> {
        conformance::Wide::cuda()
    }
}

/// Widths follow the GPU's rule (one thread, or whole warps up to the
/// block's threads) and are refused with a typed error otherwise; a block
/// of 64 threads runs a handler of width 64 with every thread.
#[test]
fn widths_are_whole_warps_up_to_the_block() {
    let rt = runtime();
    for refused in [
        rt.launch::<WideAt<48>, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}),
        rt.launch::<WideAt<64>, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}),
    ] {
        assert!(matches!(
            refused,
            Err(LaunchError::Unsupported {
                backend: BackendKind::Cuda,
                ..
            })
        ));
    }
    assert!(CHostBackend::with_block_threads(0).is_err());
    let rt = Runtime::builder()
        .device(CHostBackend::with_block_threads(64).unwrap())
        .build()
        .unwrap();
    let mut slot = rt
        .launch::<WideAt<64>, ChannelWaiter>(0, &LaunchOptions::default(), |_| {})
        .unwrap();
    for (k, n) in [5000u32, 63, 64, 65].into_iter().enumerate() {
        let got: [u32; 2] = conformance::ask(&mut slot, conformance::Squares(n))
            .wait()
            .unwrap()
            .decode()
            .unwrap();
        let want = (0..n).fold(0u32, |s, i| s.wrapping_add(i.wrapping_mul(i)));
        assert_eq!(got, [want, k as u32 + 1], "Squares({n}) on 64 threads");
    }
    slot.terminate(conformance::DEADLINE);
}

/// The clock exchange the cuda backend recalibrates `clock_offset` with,
/// through the running loop: a block answers serving an actor (idle and
/// busy) and dormant. On the host both clocks are one, so every reading
/// must lie inside the host's bracket.
#[test]
fn a_block_answers_clock_readings_serving_and_dormant() {
    let backend = CHostBackend::new();
    let rt = Runtime::builder().device(backend.clone()).build().unwrap();
    assert_eq!(backend.sample_clock(0), None, "no block yet");
    let check = |what: &str, s: Option<ringkernel_cuda::ClockSample>| {
        let s = s.unwrap_or_else(|| panic!("{what}: no answer"));
        assert!(
            s.offset_ns.unsigned_abs() <= s.bracket_ns / 2 + 1,
            "{what}: the reading lies outside the bracket: {s:?}"
        );
    };
    let mut slot = rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    assert_eq!(echo(&mut slot, 1), 1);
    check("serving, idle", backend.sample_clock(0));
    for _ in 0..5 {
        for _ in 0..2000 {
            conformance::tell(&mut slot, conformance::Add(1));
        }
        check("serving, busy", backend.sample_clock(0));
    }
    assert_eq!(echo(&mut slot, 2), 2);
    slot.terminate(conformance::DEADLINE);
    while backend.dormant_blocks() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    check("dormant", backend.sample_clock(0));
    assert_eq!(backend.sample_clock(1), None, "no such block");
}
