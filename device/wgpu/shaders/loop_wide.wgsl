// The wgpu backend's device loop for a kernel of declared width W > 1: one
// workgroup of W invocations per actor slot serves that slot's batch in
// order, one message at a time; every invocation runs the handler, which
// may share the work of one message across the workgroup (workgroup
// memory, workgroupBarrier). The slot's state lives in workgroup memory
// (`rk_state`) for the dispatch. Invocation 0's status, reply and later
// entries are the run's; the loop's decisions are made uniform through
// workgroupUniformLoad, so barriers in handlers stay in uniform control
// flow. Prepended: protocol.wgsl, the kernel's constants (RK_WIDTH among
// them), its handler, emit.wgsl.
//
// The handler's contract:
//   fn rk_handle(lid: u32, msg: Envelope, reply: ptr<function, Reply>,
//                later: ptr<function, Later>) -> u32
// `lid` is the invocation's index in the workgroup (0..RK_WIDTH); the
// state is `rk_state`; every invocation must reach the same barriers.

var<workgroup> rk_state: array<u32, RK_STATE_WORDS>;
// Invocation 0's verdict on the run (0: go on), shared with the others.
var<workgroup> rk_stop: u32;

@compute @workgroup_size(RK_WIDTH)
fn rk_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let slot = wid.x;
    if slot >= dispatch.slots {
        return;
    }
    for (var w = lid; w < RK_STATE_WORDS; w = w + RK_WIDTH) {
        rk_state[w] = cells[slot].state[w];
    }
    if lid == 0u {
        rk_stop = cells[slot].fault;
    }
    let batch = batches[slot];
    var hlc = cells[slot].hlc;
    var fault = cells[slot].fault;
    var done = 0u;
    // Publishes the state and the verdict to every invocation.
    var stop = workgroupUniformLoad(&rk_stop);
    for (var i = 0u; i < batch.count; i = i + 1u) {
        if stop != 0u {
            break;
        }
        let msg = inbox[batch.first + i];
        var reply: Reply;
        var later: Later;
        let status = rk_handle(lid, msg, &reply, &later);
        if lid == 0u {
            // The slot merges the sender's stamp on dequeue.
            hlc = hlc_receive(hlc, msg.hlc, dispatch.pt);
            fault = rk_emit(slot, batch.first + i, msg, status, reply, later, &hlc);
            if fault == 0u {
                done = done + 1u;
            }
            rk_stop = fault;
        }
        stop = workgroupUniformLoad(&rk_stop);
    }
    workgroupBarrier();
    for (var w = lid; w < RK_STATE_WORDS; w = w + RK_WIDTH) {
        cells[slot].state[w] = rk_state[w];
    }
    if lid == 0u {
        cells[slot].hlc = hlc;
        cells[slot].processed = done;
        cells[slot].fault = fault;
    }
}
