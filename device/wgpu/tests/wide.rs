//! A handler of declared width 16 on the wgpu backend: a workgroup per
//! slot, every invocation working on each message (one lane per word of a
//! dot product, a barrier, a reduction by lane 0), the state in workgroup
//! memory. Each reply depends on every earlier message (the weights grow
//! by each message), so a reordering, a lost or a doubled message, or a
//! race between lanes shows.

mod common;
use common::*;
use ringkernel::backend::WgslHandler;
use ringkernel::conformance::{self, ChannelWaiter};
use ringkernel::kernel::{Kernel, Message, Width};
use ringkernel::runtime::LaunchOptions;

#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Dot([u32; 16]);
impl Message for Dot {
    const TYPE_ID: u32 = 1;
    type Reply = [u32; 2];
}

struct Wide;
impl Kernel for Wide {
    /// Weights 0..16, then the count of messages.
    type State = [u32; 17];
    const NAME: &'static str = "wide-dot";
    const WIDTH: Width = Width::Block(16);
    fn wgsl() -> Option<WgslHandler> {
        Some(WgslHandler {
            source: r#"
var<workgroup> dot_partial: array<u32, 16>;

fn rk_handle(lid: u32, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    if lid < 16u {
        dot_partial[lid] = msg.payload[lid] * rk_state[lid];
    }
    workgroupBarrier();
    if lid < 16u {
        rk_state[lid] = rk_state[lid] + msg.payload[lid];
    }
    var status = RK_DONE;
    if lid == 0u {
        var sum = 0u;
        for (var k = 0u; k < 16u; k = k + 1u) {
            sum = sum + dot_partial[k];
        }
        rk_state[16] = rk_state[16] + 1u;
        (*reply).len = 8u;
        (*reply).payload[0] = sum;
        (*reply).payload[1] = rk_state[16];
        status = RK_REPLIED;
    }
    workgroupBarrier();
    return status;
}
"#,
            types: &[Dot::TYPE_ID],
            max_later: 0,
        })
    }
}

#[test]
fn a_workgroup_wide_handler_serves_each_message_in_order() {
    let Some(rt) = runtime() else { return };
    let mut weights: [u32; 17] = std::array::from_fn(|i| if i < 16 { i as u32 + 1 } else { 0 });
    let mut slot = rt
        .launch::<Wide, ChannelWaiter>(weights, &LaunchOptions::default(), |_| {})
        .unwrap();
    let message = |k: u32| Dot(std::array::from_fn(|i| (k * 7 + i as u32 * 3) % 11));
    // Sent all at once, so the loop serves them in batches.
    let pending: Vec<_> = (0..300u32)
        .map(|k| conformance::ask(&mut slot, message(k)))
        .collect();
    for (k, p) in (0..300u32).zip(pending) {
        let m = message(k).0;
        let want = (0..16).fold(0u32, |s, i| s.wrapping_add(m[i].wrapping_mul(weights[i])));
        for i in 0..16 {
            weights[i] = weights[i].wrapping_add(m[i]);
        }
        weights[16] += 1;
        let got: [u32; 2] = p.wait().unwrap().decode().unwrap();
        assert_eq!(got, [want, weights[16]], "message {k}");
    }
    slot.terminate(conformance::DEADLINE);
}
