// The wgpu backend's device loop, one dispatch of it: invocation `slot`
// serves that actor slot's batch in order, one message at a time, through
// the kernel's `rk_handle`, and reports how many it processed (the host
// checks the count: a driver that cuts a loop short is caught, never
// trusted). Prepended: protocol.wgsl, `const RK_STATE_WORDS`, the kernel's
// handler.
//
// The handler's contract:
//   fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>,
//                msg: Envelope, reply: ptr<function, Reply>) -> u32
// returns RK_DONE, RK_REPLIED (with `reply` filled), RK_FAULT + detail, or
// RK_PANIC.

struct Reply {
    // Payload bytes (a multiple of 4, at most 64).
    len: u32,
    payload: array<u32, 16>,
}

const RK_DONE: u32 = 0u;
const RK_REPLIED: u32 = 1u;
const RK_FAULT: u32 = 0x100u;
// The handler aborts (what a panic is on the cpu backend).
const RK_PANIC: u32 = 0xFFFFFFFFu;
// The handler's reply is longer than a slot's inline payload.
const RK_REPLY_TOO_LARGE: u32 = 0xFFFFFFFEu;

struct Dispatch {
    // Physical time (ns) for the HLC, read by the host once per dispatch.
    pt: vec2<u32>,
    // Slots in this dispatch.
    slots: u32,
    _pad: u32,
}

struct SlotBatch {
    // This slot's messages: inbox[first .. first + count].
    first: u32,
    count: u32,
}

struct SlotCell {
    hlc: vec2<u32>,
    // Messages processed by this dispatch.
    processed: u32,
    // 0, or the status of the handler run that faulted (the slot stops).
    fault: u32,
    // The slot's clock domain (stamps its replies).
    domain: u32,
    state: array<u32, RK_STATE_WORDS>,
}

@group(0) @binding(0) var<uniform> dispatch: Dispatch;
@group(0) @binding(1) var<storage, read> batches: array<SlotBatch>;
@group(0) @binding(2) var<storage, read> inbox: array<Envelope>;
@group(0) @binding(3) var<storage, read_write> outbox: array<Envelope>;
@group(0) @binding(4) var<storage, read_write> cells: array<SlotCell>;

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
        let status = rk_handle(&state, msg, &reply);
        if status >= RK_FAULT {
            fault = status;
            break;
        }
        if status == RK_REPLIED && reply.len > 64u {
            fault = RK_REPLY_TOO_LARGE;
            break;
        }
        var out: Envelope;
        if status == RK_REPLIED && (rk_flags(msg) & RK_FLAG_ASK) != 0u {
            hlc = hlc_tick(hlc, dispatch.pt);
            // magic "RK", version 1, flags REPLY
            out.magic_version_flags = 0x4B52u | (1u << 16u) | (RK_FLAG_REPLY << 24u);
            out.type_id = msg.type_id;
            out.payload_len = reply.len;
            out.clock_domain = cells[slot].domain;
            out.correlation = msg.correlation;
            out.src = msg.dst;
            out.dst = msg.src;
            out.hlc = hlc;
            out.seq = msg.seq;
            out.trace_id = msg.trace_id;
            out.payload = reply.payload;
        }
        // type_id 0: no reply for this message.
        outbox[batch.first + i] = out;
        done = done + 1u;
    }
    cells[slot].state = state;
    cells[slot].hlc = hlc;
    cells[slot].processed = done;
    cells[slot].fault = fault;
}
