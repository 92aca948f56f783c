//! The backend conformance suite — the very list the cpu backend runs — on
//! the wgpu backend, through the runtime: GPU actors whose handlers are
//! WGSL, served by the host-driven dispatch loop. In CI on lavapipe
//! (`RINGKERNEL_REQUIRE_WGPU=1`); elsewhere without an adapter it skips
//! with a reason.

mod common;
use common::*;
use ringkernel::conformance::{self, ChannelWaiter, Echo, Probe};
use ringkernel::id::ActorId;
use ringkernel::kernel::BackendKind;
use ringkernel::link::{ConnectError, LinkOptions};
use ringkernel::runtime::{LaunchError, LaunchOptions, Runtime, SubmitError};

#[test]
fn the_conformance_suite_on_wgpu() {
    let Some(rt) = runtime() else { return };
    assert_eq!(rt.backend(), BackendKind::Wgpu);
    for (name, check) in conformance::ALL {
        check(&rt);
        eprintln!("{name}: ok");
    }
}

#[test]
fn what_the_wgpu_backend_cannot_do_is_a_typed_error() {
    let Some(rt) = runtime() else { return };
    // A kernel with only cpu handlers.
    assert!(matches!(
        rt.launch::<CpuOnly, ChannelWaiter>(0, &LaunchOptions::default(), |_| {}),
        Err(LaunchError::NoHandler {
            kernel: "cpu-only",
            backend: BackendKind::Wgpu
        })
    ));
    // No option is accepted and ignored.
    assert!(matches!(
        rt.launch::<Probe, ChannelWaiter>(
            Default::default(),
            &LaunchOptions::default().checkpoint_every(10),
            |_| {}
        ),
        Err(LaunchError::Unsupported {
            backend: BackendKind::Wgpu,
            what: "checkpoint_every"
        })
    ));
    let a = rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    let b = rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), |_| {})
        .unwrap();
    // K2K links are served (host-mediated); bad links are typed errors.
    assert!(rt.connect(a.id(), b.id(), LinkOptions::default()).is_ok());
    assert_eq!(
        rt.connect(a.id(), b.id(), LinkOptions::default()),
        Err(ConnectError::AlreadyLinked {
            from: a.id(),
            to: b.id()
        })
    );
    assert!(matches!(
        rt.connect(b.id(), a.id(), LinkOptions::default()),
        Err(ConnectError::Cycle { .. })
    ));
    assert!(matches!(
        rt.connect(a.id(), a.id(), LinkOptions::default()),
        Err(ConnectError::NotLinkable(_))
    ));
}

/// A kernel with cpu handlers only.
struct CpuOnly;

impl ringkernel::kernel::Kernel for CpuOnly {
    type State = u64;
    const NAME: &'static str = "cpu-only";
    fn cpu_handlers() -> Option<ringkernel::kernel::CpuHandlers<Self>> {
        Some(
            ringkernel::kernel::CpuHandlers::new().on(|_: &mut u64, Echo(v), ctx| {
                ctx.reply(v);
                Ok(())
            }),
        )
    }
}

/// Probe's handler, declared a warp wide: the wgpu loop runs one thread
/// per slot, so the width is refused rather than ignored.
struct WideProbe;

impl ringkernel::kernel::Kernel for WideProbe {
    type State = ringkernel::conformance::ProbeState;
    const NAME: &'static str = "wide-probe";
    const WIDTH: ringkernel::kernel::Width = ringkernel::kernel::Width::Block(512);
    fn wgsl() -> Option<ringkernel::backend::WgslHandler> {
        Probe::wgsl()
    }
}

#[test]
fn a_declared_width_the_loop_cannot_honour_is_refused() {
    let Some(rt) = runtime() else { return };
    assert!(matches!(
        rt.launch::<WideProbe, ChannelWaiter>(
            Default::default(),
            &LaunchOptions::default(),
            |_| {}
        ),
        Err(LaunchError::Unsupported {
            backend: BackendKind::Wgpu,
            ..
        })
    ));
}

#[test]
fn a_runtime_asked_for_wgpu_without_its_device_is_refused() {
    assert!(matches!(
        Runtime::builder().backend(BackendKind::Wgpu).build(),
        Err(LaunchError::NoHandler {
            backend: BackendKind::Wgpu,
            ..
        })
    ));
}

/// A lost device: the ask in flight and those after it resolve with the
/// device's fault, the adapter hears of it, and a later launch is refused
/// or faults at once — nothing hangs, nothing is silently dropped.
#[test]
fn a_lost_device_faults_every_slot_and_hangs_no_caller() {
    let Some(backend) = backend() else { return };
    let rt = Runtime::builder().device(backend.clone()).build().unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let mut slot = rt
        .launch::<Probe, ChannelWaiter>(Default::default(), &LaunchOptions::default(), move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .unwrap();
    let echo = |slot: &mut ringkernel::runtime::GpuSlot<ChannelWaiter>, v: u64| {
        conformance::ask(slot, Echo(v)).wait()
    };
    assert_eq!(echo(&mut slot, 7).unwrap().decode::<u64>(), Ok(7));
    backend.device().destroy();
    // Each ask after the loss is either accepted and then resolved with the
    // device's fault, or — once the loop has seen the loss and closed the
    // slot, which may come before any of them — refused with the message
    // handed back. Neither hangs; which one a given ask gets is a race.
    let mut accepted = Vec::new();
    for i in 0..5u64 {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        match slot.ask(Echo(i).into(), ChannelWaiter(tx), ActorId::NONE) {
            Ok(_) => accepted.push(rx),
            Err(SubmitError::Closed((payload, _))) => {
                assert_eq!(payload.get::<Echo>().map(|e| e.0), Some(i), "handed back");
            }
            Err(e) => panic!("an ask to a lost device: {e:?}"),
        }
    }
    for rx in accepted {
        match rx.recv_timeout(conformance::DEADLINE).expect("an ask hung") {
            Err(ringkernel::runtime::AskError::Faulted(f)) => {
                assert_eq!(f.code, ringkernel::control::FaultCode::DeviceError);
                assert_eq!(f.detail, ringkernel_wgpu::DEVICE_FAILED);
            }
            other => panic!("an ask to a lost device: {other:?}"),
        }
    }
    assert!(matches!(
        events.recv_timeout(conformance::DEADLINE),
        Ok(ringkernel::runtime::SlotEvent::Faulted(_))
    ));
    assert!(!slot.is_open());
}

/// A backlog keeps two dispatches in flight (the newer chained on the
/// older's cells on the device), and the order-sensitive results stay
/// exact: 20 000 tells, then the sequence report.
#[test]
fn a_backlog_keeps_two_dispatches_in_flight() {
    let Some(backend) = backend() else { return };
    let rt = Runtime::builder().device(backend.clone()).build().unwrap();
    let mut slot = rt
        .launch::<Probe, ChannelWaiter>(
            Default::default(),
            &LaunchOptions::default().h2k_capacity(4096),
            |_| {},
        )
        .unwrap();
    let before = backend.stats();
    let n = 20_000u64;
    for i in 0..n {
        conformance::tell(&mut slot, ringkernel::conformance::Seq(i));
    }
    let report: [u64; 2] = conformance::ask(&mut slot, ringkernel::conformance::SeqReport())
        .wait()
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(report, [n, 0], "[seen, out of order]");
    let after = backend.stats();
    eprintln!("dispatches {before:?} -> {after:?}");
    assert!(
        after.overlapped > before.overlapped,
        "no dispatch was submitted while another was in flight"
    );
}
