//! The backend conformance suite on the cpu backend, one test per check.

use ringkernel::conformance;
use ringkernel::runtime::Runtime;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            let rt = Runtime::new().expect("cpu runtime");
            conformance::$name(&rt);
        }
    )*};
}

checks!(
    ask_round_trip,
    tells_and_state_kept,
    in_order_delivery,
    deactivate_then_activate,
    terminate_fails_every_waiter,
    handler_panic_faults,
    handler_error_faults,
    no_reply,
    runs_on_the_device_thread,
    deferred_replies_in_reverse_order,
    unknown_type_is_refused,
    sends_from_a_kernel_arrive_in_order,
    faults_and_restarts_lose_nothing,
    linked_sends_arrive_in_order,
    a_restarted_receiver_carries_on_over_its_link,
    wide_handlers_share_each_message,
);

/// The list the suite exports matches the tests above (a new check must get
/// a test here too).
#[test]
fn every_check_has_a_test() {
    assert_eq!(conformance::ALL.len(), 16);
}
