// The wgpu backend's device loop, one dispatch of it: invocation `slot`
// serves that actor slot's batch in order, one message at a time, through
// the kernel's `rk_handle`, and reports how many it processed (the host
// checks the count: a driver that cuts a loop short is caught, never
// trusted). Prepended: protocol.wgsl, `const RK_STATE_WORDS`, the kernel's
// handler.
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

struct Reply {
    // Payload bytes (a multiple of 4, at most 64).
    len: u32,
    payload: array<u32, 16>,
}

// A reply to an ask deferred earlier.
struct LaterReply {
    correlation: vec2<u32>,
    dst: vec2<u32>,
    type_id: u32,
    len: u32,
    payload: array<u32, 16>,
}

struct Later {
    n: u32,
    replies: array<LaterReply, RK_LATER_SLOTS>,
}

// Output envelopes per message: its reply, then the later ones.
const RK_OUTS: u32 = 1u + RK_MAX_LATER;

const RK_DONE: u32 = 0u;
const RK_REPLIED: u32 = 1u;
const RK_DEFERRED: u32 = 2u;
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
        var later: Later;
        let status = rk_handle(&state, msg, &reply, &later);
        if status >= RK_FAULT {
            fault = status;
            break;
        }
        if (status == RK_REPLIED && reply.len > 64u) || later.n > RK_MAX_LATER {
            fault = RK_REPLY_TOO_LARGE;
            break;
        }
        var too_large = false;
        for (var k = 0u; k < later.n; k = k + 1u) {
            too_large = too_large || later.replies[k].len > 64u;
        }
        if too_large {
            fault = RK_REPLY_TOO_LARGE;
            break;
        }
        let base = (batch.first + i) * RK_OUTS;
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
        if out.type_id == 0u {
            // No reply now; `seq` tells the host whether one will come.
            out.seq = vec2<u32>(status, 0u);
        }
        outbox[base] = out;
        for (var k = 0u; k < later.n; k = k + 1u) {
            let l = later.replies[k];
            hlc = hlc_tick(hlc, dispatch.pt);
            var e: Envelope;
            // Correlation 0: a send, which the poller routes once `seq`
            // (this message) has committed; else a reply to a deferred ask.
            let send = l.correlation.x == 0u && l.correlation.y == 0u;
            var flags = RK_FLAG_REPLY;
            if send {
                flags = 0u;
                e.seq = msg.seq;
            }
            e.magic_version_flags = 0x4B52u | (1u << 16u) | (flags << 24u);
            e.type_id = l.type_id;
            e.payload_len = l.len;
            e.clock_domain = cells[slot].domain;
            e.correlation = l.correlation;
            e.src = msg.dst;
            e.dst = l.dst;
            e.hlc = hlc;
            e.payload = l.payload;
            outbox[base + 1u + k] = e;
        }
        done = done + 1u;
    }
    cells[slot].state = state;
    cells[slot].hlc = hlc;
    cells[slot].processed = done;
    cells[slot].fault = fault;
}
