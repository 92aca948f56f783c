// The ringkernel protocol as WGSL sees it: the envelope's bytes as 32-bit
// words (WGSL has no u64; 64-bit fields are vec2<u32>, low word first, which
// WGSL aligns to 8 bytes exactly as the Rust and C layouts do). The offsets
// are checked against Rust's `offset_of!` by naga reflection in the tests.

// One slot: the 64-byte header, then 64 bytes of inline payload.
struct Envelope {
    // magic (bits 0..16) | version (16..24) | flags (24..32)
    magic_version_flags: u32,
    type_id: u32,
    payload_len: u32,
    clock_domain: u32,
    correlation: vec2<u32>,
    src: vec2<u32>,
    dst: vec2<u32>,
    hlc: vec2<u32>,
    seq: vec2<u32>,
    trace_id: vec2<u32>,
    payload: array<u32, 16>,
}

const RK_FLAG_ASK: u32 = 1u;
const RK_FLAG_REPLY: u32 = 2u;
const RK_FLAG_ERROR: u32 = 4u;
// Type id of the reply to an ask its handler neither answered nor deferred.
const RK_SYS_NO_REPLY: u32 = 0xFFFF0001u;

fn rk_flags(e: Envelope) -> u32 {
    return e.magic_version_flags >> 24u;
}

// --- 64-bit words as vec2<u32> (x low, y high) ------------------------------

fn u64_lt(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

fn u64_max(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    if u64_lt(a, b) {
        return b;
    }
    return a;
}

// a + 1, saturating at 2^64 - 1 (the HLC horizon: the word sticks there).
fn u64_inc(a: vec2<u32>) -> vec2<u32> {
    if a.x == 0xFFFFFFFFu {
        if a.y == 0xFFFFFFFFu {
            return a;
        }
        return vec2<u32>(0u, a.y + 1u);
    }
    return vec2<u32>(a.x + 1u, a.y);
}

// a + b, wrapping (as Rust's u64::wrapping_add).
fn u64_add(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    let carry = select(0u, 1u, lo < a.x);
    return vec2<u32>(lo, a.y + b.y + carry);
}

// --- HLC (one word: physical ns with the low 4 bits a logical counter) ------

// Physical time, supplied by the host per dispatch, without its logical bits.
fn hlc_floor(pt: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(pt.x & 0xFFFFFFF0u, pt.y);
}

// A local event or send: w = max(w + 1, pt & !0xF).
fn hlc_tick(w: vec2<u32>, pt: vec2<u32>) -> vec2<u32> {
    return u64_max(u64_inc(w), hlc_floor(pt));
}

// A receipt: w = max(w + 1, m + 1, pt & !0xF).
fn hlc_receive(w: vec2<u32>, m: vec2<u32>, pt: vec2<u32>) -> vec2<u32> {
    return u64_max(u64_max(u64_inc(w), u64_inc(m)), hlc_floor(pt));
}
