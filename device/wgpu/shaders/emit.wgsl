// What the wgpu loops share: the handler's output types, the bindings,
// and what the loop does with one handler run's outputs (`rk_emit`).
// Prepended: protocol.wgsl, the kernel's constants, its handler.

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


// An envelope header from the slot (magic "RK", version 1), payload empty.
fn rk_envelope(slot: u32, flags: u32, type_id: u32, correlation: vec2<u32>, src: vec2<u32>,
               dst: vec2<u32>, hlc: vec2<u32>) -> Envelope {
    var e: Envelope;
    e.magic_version_flags = 0x4B52u | (1u << 16u) | (flags << 24u);
    e.type_id = type_id;
    e.clock_domain = cells[slot].domain;
    e.correlation = correlation;
    e.src = src;
    e.dst = dst;
    e.hlc = hlc;
    return e;
}

// Checks one run's outputs and writes them to the outbox: the reply (or,
// for no reply now, the status in `seq`), then the later entries (replies
// to deferred asks, or sends). Returns 0, or the status that faults the
// slot (nothing written).
fn rk_emit(slot: u32, index: u32, msg: Envelope, status: u32, reply: Reply, later: Later,
           hlc: ptr<function, vec2<u32>>) -> u32 {
    if status >= RK_FAULT {
        return status;
    }
    if (status == RK_REPLIED && reply.len > 64u) || later.n > RK_MAX_LATER {
        return RK_REPLY_TOO_LARGE;
    }
    for (var k = 0u; k < later.n; k = k + 1u) {
        if later.replies[k].len > 64u {
            return RK_REPLY_TOO_LARGE;
        }
    }
    let base = index * RK_OUTS;
    let ask = (rk_flags(msg) & RK_FLAG_ASK) != 0u;
    var out: Envelope;
    if ask && status == RK_REPLIED {
        *hlc = hlc_tick(*hlc, dispatch.pt);
        out = rk_envelope(slot, RK_FLAG_REPLY, msg.type_id, msg.correlation, msg.dst, msg.src, *hlc);
        out.payload_len = reply.len;
        out.seq = msg.seq;
        out.trace_id = msg.trace_id;
        out.payload = reply.payload;
    } else if ask && status != RK_DEFERRED {
        // An ask its handler neither answered nor deferred: NoReply, stamped
        // by the slot's clock like any reply.
        *hlc = hlc_tick(*hlc, dispatch.pt);
        out = rk_envelope(slot, RK_FLAG_REPLY | RK_FLAG_ERROR, RK_SYS_NO_REPLY, msg.correlation,
                          msg.dst, msg.src, *hlc);
    } else {
        // No reply now; `seq` tells the host whether one will come.
        out.seq = vec2<u32>(status, 0u);
    }
    outbox[base] = out;
    for (var k = 0u; k < later.n; k = k + 1u) {
        let l = later.replies[k];
        *hlc = hlc_tick(*hlc, dispatch.pt);
        // Correlation 0: a send, which the poller routes once `seq` (this
        // message) has committed; else a reply to a deferred ask.
        let send = l.correlation.x == 0u && l.correlation.y == 0u;
        var flags = RK_FLAG_REPLY;
        if send {
            flags = 0u;
        }
        var e = rk_envelope(slot, flags, l.type_id, l.correlation, msg.dst, l.dst, *hlc);
        if send {
            e.seq = msg.seq;
        }
        e.payload_len = l.len;
        e.payload = l.payload;
        outbox[base + 1u + k] = e;
    }
    return 0u;
}
