// The wgpu backend's device loop, one dispatch of it: invocation `slot`
// serves that actor slot's batch in order, one message at a time, through
// the kernel's `rk_handle`, and reports how many it processed (the host
// checks the count: a driver that cuts a loop short is caught, never
// trusted). Prepended: protocol.wgsl, the kernel's constants, its handler,
// emit.wgsl.
//
// The handler's contract:
//   fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>,
//                msg: Envelope, reply: ptr<function, Reply>,
//                later: ptr<function, Later>) -> u32
// returns RK_DONE, RK_REPLIED (with `reply` filled), RK_DEFERRED (the ask
// will be answered by a later run), RK_FAULT + detail, or RK_PANIC. Any run
// may also answer asks deferred earlier, and send tells to other actors:
// `later.n` entries in `later` (at most RK_MAX_LATER) — a reply addressed
// by the correlation and sender it kept, or, with correlation 0, a send to
// actor `dst` that the host routes once this message commits.

@compute @workgroup_size(1)
fn rk_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let slot = gid.x;
    if slot >= dispatch.slots {
        return;
    }
    let batch = batches[slot];
    var state = cells[slot].state;
    var hlc = cells[slot].hlc;
    var fault = cells[slot].fault;
    var done = 0u;
    for (var i = 0u; i < batch.count; i = i + 1u) {
        if fault != 0u {
            break;
        }
        let msg = inbox[batch.first + i];
        // The slot merges the sender's stamp on dequeue.
        hlc = hlc_receive(hlc, msg.hlc, dispatch.pt);
        var reply: Reply;
        var later: Later;
        let status = rk_handle(&state, msg, &reply, &later);
        fault = rk_emit(slot, batch.first + i, msg, status, reply, later, &hlc);
        if fault != 0u {
            break;
        }
        done = done + 1u;
    }
    cells[slot].state = state;
    cells[slot].hlc = hlc;
    cells[slot].processed = done;
    cells[slot].fault = fault;
}
