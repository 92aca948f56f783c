//! A handler that never returns, on the c-host backend with quiescing
//! fences (the cuda backend's protocol without host-native atomics): the
//! watchdog faults the slot, the fence waits out its bound for a stop the
//! hung loop cannot acknowledge, and the ask resolves — no caller hangs.
//! (The hung block thread is left spinning, as a hung GPU block would be;
//! this test has its own binary for that reason.)

use ringkernel::backend::CudaHandler;
use ringkernel::conformance::{self, ChannelWaiter, Echo};
use ringkernel::control::FaultCode;
use ringkernel::kernel::Kernel;
use ringkernel::runtime::{AskError, LaunchOptions, Runtime};
use ringkernel_cuda::{CHostBackend, QUIESCE_WAIT};
use std::time::{Duration, Instant};

struct Hang;
impl Kernel for Hang {
    type State = u64;
    const NAME: &'static str = "hang";
    fn cuda() -> Option<CudaHandler> {
        Some(CudaHandler {
            source: r#"
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    if (rk_get_u64(payload, 0) == 0) return rk_reply_u64(reply, 0);
    volatile uint32_t forever = 1;
    while (forever) {}
    return RK_DONE;
}
"#,
            types: &[1],
            max_later: 0,
        })
    }
}

#[test]
fn a_hung_handler_is_fenced_after_the_quiesce_bound_and_its_ask_resolves() {
    let rt = Runtime::builder()
        .device(CHostBackend::quiescing())
        .watchdog(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut slot = rt
        .launch::<Hang, ChannelWaiter>(0, &LaunchOptions::default(), |_| {})
        .unwrap();
    // Served before the hang.
    assert_eq!(
        conformance::ask(&mut slot, Echo(0))
            .wait()
            .unwrap()
            .decode::<u64>(),
        Ok(0)
    );
    let start = Instant::now();
    let hung = conformance::ask(&mut slot, Echo(1));
    match hung.wait() {
        Err(AskError::Faulted(f)) => assert_eq!(f.code, FaultCode::Watchdog),
        other => panic!("a hung handler's ask: {other:?}"),
    }
    let recovery = slot.recover();
    assert_eq!(
        recovery.committed_seq, 1,
        "the first ask committed, the hung one not"
    );
    eprintln!(
        "resolved after {:?} (watchdog 300 ms, quiesce bound {QUIESCE_WAIT:?})",
        start.elapsed()
    );
    std::mem::forget(rt);
}
