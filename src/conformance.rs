//! The backend conformance suite: the behaviours every backend must show,
//! written once. Each check takes a [`Runtime`] (which picks the backend)
//! and panics with a description when the backend misbehaves, so a backend
//! crate runs the very same list from its tests:
//!
//! ```
//! # use ringkernel::{conformance, runtime::Runtime};
//! let rt = Runtime::new()?; // the cpu backend
//! for (name, check) in conformance::ALL {
//!     check(&rt);
//!     println!("{name}: ok");
//! }
//! # Ok::<(), ringkernel::runtime::LaunchError>(())
//! ```
//!
//! The kernels used here ([`Probe`], [`Reverse`], [`Relay`], [`Wide`]) are
//! public so adapters and backends can run framework-level versions of the
//! same checks. Two checks need K2K links: on a backend that serves none
//! they check the typed refusal instead (the cpu backend must serve them).

use crate::control::LifecycleState;
use crate::id::ActorId;
use crate::kernel::{CpuHandlers, Deferred, HandlerError, Kernel, Message, Payload, Reply};
use crate::runtime::{AskError, GpuSlot, LaunchOptions, Runtime, SlotEvent, SubmitError, Waiter};
use bytemuck::{Pod, Zeroable};
use std::sync::mpsc;
use std::time::Duration;

/// How long a check waits for any one outcome before declaring a hang.
pub const DEADLINE: Duration = Duration::from_secs(20);

macro_rules! message {
    ($(#[$doc:meta])* $name:ident($($field:ty),*) = $id:literal => $reply:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
        #[repr(C)]
        pub struct $name($(pub $field),*);
        impl Message for $name {
            const TYPE_ID: u32 = $id;
            type Reply = $reply;
        }
    };
}

message!(
    /// Ask: replies with its argument.
    Echo(u64) = 1 => u64
);
message!(
    /// Tell: adds to the running total.
    Add(u64) = 2 => ()
);
message!(
    /// Ask: the running total.
    Total() = 3 => u64
);
message!(
    /// Tell with a sequence number; out-of-order numbers are counted.
    Seq(u64) = 4 => ()
);
message!(
    /// Ask: (messages seen by `Seq`, out-of-order count).
    SeqReport() = 5 => [u64; 2]
);
message!(
    /// Ask that the handler never answers.
    Silent() = 6 => u64
);
message!(
    /// Ask whose handler panics.
    Explode() = 7 => u64
);
message!(
    /// Ask whose handler returns a fault code.
    Fail(u32) = 8 => u64
);
message!(
    /// Ask: a hash of the name of the thread that ran the handler.
    WhereAmI() = 9 => u64
);
message!(
    /// A tell no conformance kernel serves.
    Stray(u64) = 0x7F => ()
);
message!(
    /// Ask: the handler sleeps this many milliseconds, then replies with
    /// how many naps it has taken (a slow or hung handler, for watchdog
    /// and fencing tests).
    Nap(u64) = 10 => u64
);

/// State of the [`Probe`] kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct ProbeState {
    /// Sum of `Add`s.
    pub total: u64,
    /// `Seq` messages seen.
    pub seen: u64,
    /// Next expected `Seq`.
    pub next: u64,
    /// `Seq` messages out of order.
    pub disorder: u64,
    /// `Nap`s taken.
    pub naps: u64,
}

/// The conformance kernel: every behaviour in one kernel.
#[derive(Debug)]
pub struct Probe;

/// FNV-1a of a thread name.
pub fn thread_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Kernel for Probe {
    type State = ProbeState;
    const NAME: &'static str = "probe";

    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new()
                .on::<Echo>(|_, Echo(v), ctx| {
                    ctx.reply(v);
                    Ok(())
                })
                .on::<Add>(|s, Add(v), _| {
                    s.total += v;
                    Ok(())
                })
                .on::<Total>(|s, _, ctx| {
                    ctx.reply(s.total);
                    Ok(())
                })
                .on::<Seq>(|s, Seq(n), _| {
                    if n != s.next {
                        s.disorder += 1;
                    }
                    s.next = n + 1;
                    s.seen += 1;
                    Ok(())
                })
                .on::<SeqReport>(|s, _, ctx| {
                    ctx.reply([s.seen, s.disorder]);
                    Ok(())
                })
                .on::<Silent>(|_, _, _| Ok(()))
                .on::<Explode>(|_, _, _| panic!("conformance: handler panic on purpose"))
                .on::<Fail>(|_, Fail(code), _| Err(HandlerError(code)))
                .on::<Nap>(|s, Nap(ms), ctx| {
                    std::thread::sleep(Duration::from_millis(ms));
                    s.naps += 1;
                    ctx.reply(s.naps);
                    Ok(())
                })
                .on::<WhereAmI>(|_, _, ctx| {
                    ctx.reply(thread_tag(std::thread::current().name().unwrap_or("")));
                    Ok(())
                }),
        )
    }

    fn wgsl() -> Option<crate::backend::WgslHandler> {
        Some(crate::backend::WgslHandler {
            source: PROBE_WGSL,
            types: &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            max_later: 0,
        })
    }

    fn cuda() -> Option<crate::backend::CudaHandler> {
        Some(crate::backend::CudaHandler {
            source: PROBE_CUDA,
            types: &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            max_later: 0,
        })
    }
}

/// [`Probe`] in CUDA C++ (for the cuda and c-host backends). `Explode` is
/// the handler's abort (`RK_PANIC`); `Nap` counts without sleeping;
/// `WhereAmI` answers the tag of the loop's name (`RK_LOOP_NAME`:
/// `ringkernel-cuda` on a GPU, the block thread's name on the c-host).
pub const PROBE_CUDA: &str = r#"
struct ProbeState {
    uint64_t total, seen, next, disorder, naps;
};

RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    ProbeState* s = (ProbeState*)state;
    uint64_t v = msg->payload_len >= 8 ? rk_get_u64(payload, 0) : 0;
    switch (msg->type_id) {
    case 1: return rk_reply_u64(reply, v);
    case 2: s->total += v; return RK_DONE;
    case 3: return rk_reply_u64(reply, s->total);
    case 4:
        if (v != s->next) s->disorder += 1;
        s->next = v + 1;
        s->seen += 1;
        return RK_DONE;
    case 5: {
        uint64_t report[2] = {s->seen, s->disorder};
        return rk_reply_bytes(reply, report, 16);
    }
    case 6: return RK_DONE;
    case 7: return RK_PANIC;
    case 8: return RK_FAULT + (msg->payload_len >= 4 ? rk_get_u32(payload, 0) : 0u);
    case 9: return rk_reply_u64(reply, rk_fnv1a(RK_LOOP_NAME));
    case 10: s->naps += 1; return rk_reply_u64(reply, s->naps);
    default: return RK_FAULT;
    }
}
"#;

/// [`Probe`] in WGSL. State words: total 0–1, seen 2–3, next 4–5,
/// disorder 6–7, naps 8–9 (u64s as low, high). `Explode` is the WGSL
/// handler's abort (`RK_PANIC`); `Nap` counts without sleeping (a dispatch
/// cannot); `WhereAmI` answers the tag of the dispatch loop's thread.
pub const PROBE_WGSL: &str = r#"
fn probe_get(state: ptr<function, array<u32, RK_STATE_WORDS>>, at: u32) -> vec2<u32> {
    return vec2<u32>((*state)[at], (*state)[at + 1u]);
}

fn probe_set(state: ptr<function, array<u32, RK_STATE_WORDS>>, at: u32, v: vec2<u32>) {
    (*state)[at] = v.x;
    (*state)[at + 1u] = v.y;
}

fn probe_reply(reply: ptr<function, Reply>, v: vec2<u32>) -> u32 {
    (*reply).len = 8u;
    (*reply).payload[0] = v.x;
    (*reply).payload[1] = v.y;
    return RK_REPLIED;
}

fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    let v = vec2<u32>(msg.payload[0], msg.payload[1]);
    var status = RK_DONE;
    switch msg.type_id {
        case 1u: {
            status = probe_reply(reply, v);
        }
        case 2u: {
            probe_set(state, 0u, u64_add(probe_get(state, 0u), v));
        }
        case 3u: {
            status = probe_reply(reply, probe_get(state, 0u));
        }
        case 4u: {
            let next = probe_get(state, 4u);
            if v.x != next.x || v.y != next.y {
                probe_set(state, 6u, u64_inc(probe_get(state, 6u)));
            }
            probe_set(state, 4u, u64_inc(v));
            probe_set(state, 2u, u64_inc(probe_get(state, 2u)));
        }
        case 5u: {
            let seen = probe_get(state, 2u);
            let disorder = probe_get(state, 6u);
            (*reply).len = 16u;
            (*reply).payload[0] = seen.x;
            (*reply).payload[1] = seen.y;
            (*reply).payload[2] = disorder.x;
            (*reply).payload[3] = disorder.y;
            status = RK_REPLIED;
        }
        case 6u: {
            status = RK_DONE;
        }
        case 7u: {
            status = RK_PANIC;
        }
        case 8u: {
            status = RK_FAULT + msg.payload[0];
        }
        case 9u: {
            // FNV-1a of "ringkernel-wgpu", the dispatch loop's thread.
            status = probe_reply(reply, vec2<u32>(0x72c0462cu, 0x27722071u));
        }
        case 10u: {
            let naps = u64_inc(probe_get(state, 8u));
            probe_set(state, 8u, naps);
            status = probe_reply(reply, naps);
        }
        default: {
            status = RK_FAULT;
        }
    }
    return status;
}
"#;

message!(
    /// Ask answered only once a batch of `N` has arrived, in reverse order.
    Reversed(u64) = 1 => u64
);

/// Size of a [`Reverse`] batch.
pub const REVERSE_BATCH: usize = 8;

/// State of [`Reverse`]: the deferred asks of the current batch.
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
#[repr(C)]
pub struct ReverseState {
    held: u64,
    values: [u64; REVERSE_BATCH],
    ids: [[u64; 2]; REVERSE_BATCH],
}

/// Answers each batch of [`REVERSE_BATCH`] asks in reverse order of
/// arrival (deferred replies by correlation): every caller must still get
/// its own reply.
#[derive(Debug)]
pub struct Reverse;

impl Kernel for Reverse {
    type State = ReverseState;
    const NAME: &'static str = "reverse";

    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new().on::<Reversed>(|s, Reversed(v), ctx| {
                let Some(d) = ctx.defer() else { return Ok(()) };
                let i = s.held as usize;
                s.values[i] = v;
                s.ids[i] = d.to_raw();
                s.held += 1;
                if s.held as usize == REVERSE_BATCH {
                    for i in (0..REVERSE_BATCH).rev() {
                        let d = Deferred::<u64>::from_raw(s.ids[i], Reversed::TYPE_ID);
                        ctx.reply_to(d, s.values[i] * 10);
                    }
                    s.held = 0;
                }
                Ok(())
            }),
        )
    }

    fn wgsl() -> Option<crate::backend::WgslHandler> {
        Some(crate::backend::WgslHandler {
            source: REVERSE_WGSL,
            types: &[Reversed::TYPE_ID],
            max_later: REVERSE_BATCH as u32,
        })
    }

    fn cuda() -> Option<crate::backend::CudaHandler> {
        Some(crate::backend::CudaHandler {
            source: REVERSE_CUDA,
            types: &[Reversed::TYPE_ID],
            max_later: REVERSE_BATCH as u32,
        })
    }
}

/// [`Reverse`] in CUDA C++: each ask is deferred (`RK_DEFERRED`), its
/// correlation id and sender kept in the state; the batch's last run
/// answers all of them in reverse order through `later`.
pub const REVERSE_CUDA: &str = r#"
struct ReverseState {
    uint64_t held;
    uint64_t values[8];
    uint64_t ids[8][2];
};

RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    ReverseState* s = (ReverseState*)state;
    if ((msg->flags & RK_FLAG_ASK) == 0 || s->held >= 8) return RK_DONE;
    uint64_t i = s->held;
    s->values[i] = rk_get_u64(payload, 0);
    s->ids[i][0] = msg->correlation;
    s->ids[i][1] = msg->src;
    s->held = i + 1;
    if (s->held == 8) {
        for (int k = 7; k >= 0; --k) {
            uint64_t ten = s->values[k] * 10;
            if (!rk_later_push(later, s->ids[k][0], s->ids[k][1], msg->type_id, &ten, 8)) {
                return RK_PANIC;
            }
        }
        s->held = 0;
    }
    return RK_DEFERRED;
}
"#;

/// [`Reverse`] in WGSL: each ask is deferred (`RK_DEFERRED`), its
/// correlation and sender kept in the state (words: held 0–1, values 2–17,
/// ids 18–49); the batch's last run answers all of them in reverse order
/// through `later`.
pub const REVERSE_WGSL: &str = r#"
fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    if (rk_flags(msg) & RK_FLAG_ASK) == 0u {
        return RK_DONE;
    }
    let i = (*state)[0];
    (*state)[2u + 2u * i] = msg.payload[0];
    (*state)[3u + 2u * i] = msg.payload[1];
    (*state)[18u + 4u * i] = msg.correlation.x;
    (*state)[19u + 4u * i] = msg.correlation.y;
    (*state)[20u + 4u * i] = msg.src.x;
    (*state)[21u + 4u * i] = msg.src.y;
    (*state)[0] = i + 1u;
    if i + 1u == 8u {
        for (var k = 0u; k < 8u; k = k + 1u) {
            let j = 7u - k;
            let v = vec2<u32>((*state)[2u + 2u * j], (*state)[3u + 2u * j]);
            // v * 10 as a u64: (v << 3) + (v << 1).
            let v8 = vec2<u32>(v.x << 3u, (v.y << 3u) | (v.x >> 29u));
            let v2 = vec2<u32>(v.x << 1u, (v.y << 1u) | (v.x >> 31u));
            let ten = u64_add(v8, v2);
            (*later).replies[k].correlation = vec2<u32>((*state)[18u + 4u * j], (*state)[19u + 4u * j]);
            (*later).replies[k].dst = vec2<u32>((*state)[20u + 4u * j], (*state)[21u + 4u * j]);
            (*later).replies[k].type_id = msg.type_id;
            (*later).replies[k].len = 8u;
            (*later).replies[k].payload[0] = ten.x;
            (*later).replies[k].payload[1] = ten.y;
        }
        (*later).n = 8u;
        (*state)[0] = 0u;
    }
    return RK_DEFERRED;
}
"#;

message!(
    /// Tell to [`Relay`]: send `Seq(.1)` to the actor whose id bits are `.0`
    /// — unless `.1` has its top bit set ([`POISON`]): then the handler
    /// faults (code 1).
    Forward(u64, u64) = 1 => ()
);

message!(
    /// Tell to [`Relay`]: send `Forward(.1, .2)` to the actor whose id bits
    /// are `.0` (a relay too: two hops).
    Hop(u64, u64, u64) = 2 => ()
);

/// The bit that makes a [`Forward`] a poison message.
pub const POISON: u64 = 1 << 63;

/// Forwards each [`Forward`] as a [`Seq`] tell to the actor it names, and
/// each [`Hop`] as a [`Forward`] to the next relay: sends from a kernel,
/// which leave once the message commits.
#[derive(Debug)]
pub struct Relay;

impl Kernel for Relay {
    type State = u64;
    const NAME: &'static str = "relay";

    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new()
                .on::<Forward>(|_, Forward(dst, v), ctx| {
                    if v & POISON != 0 {
                        return Err(HandlerError(1));
                    }
                    ctx.send(ActorId::from_bits(dst), Seq(v));
                    Ok(())
                })
                .on::<Hop>(|_, Hop(next, dst, v), ctx| {
                    ctx.send(ActorId::from_bits(next), Forward(dst, v));
                    Ok(())
                }),
        )
    }

    fn wgsl() -> Option<crate::backend::WgslHandler> {
        Some(crate::backend::WgslHandler {
            source: RELAY_WGSL,
            types: &[Forward::TYPE_ID, Hop::TYPE_ID],
            max_later: 1,
        })
    }

    fn cuda() -> Option<crate::backend::CudaHandler> {
        Some(crate::backend::CudaHandler {
            source: RELAY_CUDA,
            types: &[Forward::TYPE_ID, Hop::TYPE_ID],
            max_later: 1,
        })
    }
}

/// [`Relay`] in WGSL: a `later` entry with correlation 0 is a send.
pub const RELAY_WGSL: &str = r#"
fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    if msg.type_id == 2u {
        (*later).replies[0].correlation = vec2<u32>(0u, 0u);
        (*later).replies[0].dst = vec2<u32>(msg.payload[0], msg.payload[1]);
        (*later).replies[0].type_id = 1u;
        (*later).replies[0].len = 16u;
        for (var i = 0u; i < 4u; i++) {
            (*later).replies[0].payload[i] = msg.payload[2u + i];
        }
        (*later).n = 1u;
        return RK_DONE;
    }
    if (msg.payload[3] & 0x80000000u) != 0u {
        return RK_FAULT + 1u;
    }
    (*later).replies[0].correlation = vec2<u32>(0u, 0u);
    (*later).replies[0].dst = vec2<u32>(msg.payload[0], msg.payload[1]);
    (*later).replies[0].type_id = 4u;
    (*later).replies[0].len = 8u;
    (*later).replies[0].payload[0] = msg.payload[2];
    (*later).replies[0].payload[1] = msg.payload[3];
    (*later).n = 1u;
    return RK_DONE;
}
"#;

/// [`Relay`] in CUDA C++ (`rk_send`).
pub const RELAY_CUDA: &str = r#"
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    if (msg->type_id == 2u) {
        uint64_t forward[2] = {rk_get_u64(payload, 8), rk_get_u64(payload, 16)};
        return rk_send(later, rk_get_u64(payload, 0), 1u, forward, 16) ? RK_DONE : RK_PANIC;
    }
    uint64_t v = rk_get_u64(payload, 8);
    if (v >> 63) return RK_FAULT + 1;
    return rk_send(later, rk_get_u64(payload, 0), 4u, &v, 8) ? RK_DONE : RK_PANIC;
}
"#;

message!(
    /// Ask to [`Wide`]: the sum of `i * i` for `i` in `0..n` (wrapping
    /// `u32` arithmetic), and how many such asks the actor has answered.
    Squares(u32) = 1 => [u32; 2]
);

/// A kernel of declared width 32 ([`Width::Warp`](crate::kernel::Width)):
/// each message's work is split over the threads of its run — thread `t`
/// sums the squares of `t, t + 32, …` into shared memory, a barrier, and
/// thread 0 adds the 32 partial sums and counts the message. A run on fewer
/// threads than declared misses terms and answers wrong; the cpu backend
/// runs the same sum on one thread.
#[derive(Debug)]
pub struct Wide;

impl Kernel for Wide {
    type State = u32;
    const NAME: &'static str = "wide";
    const WIDTH: crate::kernel::Width = crate::kernel::Width::Warp;

    fn cpu_handlers() -> Option<CpuHandlers<Self>> {
        Some(
            CpuHandlers::<Self>::new().on::<Squares>(|count, Squares(n), ctx| {
                *count += 1;
                ctx.reply([squares(n), *count]);
                Ok(())
            }),
        )
    }

    fn wgsl() -> Option<crate::backend::WgslHandler> {
        Some(crate::backend::WgslHandler {
            source: WIDE_WGSL,
            types: &[Squares::TYPE_ID],
            max_later: 0,
        })
    }

    fn cuda() -> Option<crate::backend::CudaHandler> {
        Some(crate::backend::CudaHandler {
            source: WIDE_CUDA,
            types: &[Squares::TYPE_ID],
            max_later: 0,
        })
    }
}

/// The sum of `i * i` for `i` in `0..n`, wrapping.
fn squares(n: u32) -> u32 {
    (0..n).fold(0u32, |s, i| s.wrapping_add(i.wrapping_mul(i)))
}

/// [`Wide`] in WGSL (the workgroup-wide signature: `lid`, state in
/// `rk_state`).
pub const WIDE_WGSL: &str = r#"
var<workgroup> wide_partial: array<u32, 32>;

fn rk_handle(lid: u32, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    var sum = 0u;
    for (var i = lid; i < msg.payload[0]; i = i + 32u) {
        sum = sum + i * i;
    }
    wide_partial[lid] = sum;
    workgroupBarrier();
    var status = RK_DONE;
    if lid == 0u {
        var total = 0u;
        for (var k = 0u; k < 32u; k = k + 1u) {
            total = total + wide_partial[k];
        }
        rk_state[0] = rk_state[0] + 1u;
        (*reply).len = 8u;
        (*reply).payload[0] = total;
        (*reply).payload[1] = rk_state[0];
        status = RK_REPLIED;
    }
    workgroupBarrier();
    return status;
}
"#;

/// [`Wide`] in CUDA C++ (`rk_thread`, `rk_threads`, `rk_sync`,
/// `rk_scratch`).
pub const WIDE_CUDA: &str = r#"
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    uint32_t n = rk_get_u32(payload, 0);
    uint32_t t = rk_thread(), w = rk_threads();
    uint32_t* partial = (uint32_t*)rk_scratch();
    uint32_t sum = 0;
    for (uint32_t i = t; i < n; i += w) sum += i * i;
    partial[t] = sum;
    rk_sync();
    uint32_t status = RK_DONE;
    if (t == 0) {
        uint32_t out[2] = {0, 0};
        for (uint32_t k = 0; k < w; ++k) out[0] += partial[k];
        uint32_t* count = (uint32_t*)state;
        *count += 1;
        out[1] = *count;
        status = rk_reply_bytes(reply, out, 8);
    }
    rk_sync();
    return status;
}
"#;

/// A handler of declared width 32 runs each message on 32 threads of its
/// backend (one on the cpu backend): every term of a sum split over them
/// is there, for single asks and for a batch sent at once, in order.
pub fn wide_handlers_share_each_message(rt: &Runtime) {
    let (mut slot, _) = launch::<Wide>(rt, &LaunchOptions::default());
    let mut count = 0;
    for n in [0, 1, 31, 32, 33, 1000, 4099] {
        count += 1;
        let got: [u32; 2] = ask(&mut slot, Squares(n))
            .wait()
            .expect("reply")
            .decode()
            .expect("[u32; 2]");
        assert_eq!(got, [squares(n), count], "Squares({n})");
    }
    let pending: Vec<_> = (0..200u32)
        .map(|k| (k, ask(&mut slot, Squares(40 + 7 * k))))
        .collect();
    for (k, p) in pending {
        count += 1;
        let got: [u32; 2] = p.wait().expect("reply").decode().expect("[u32; 2]");
        assert_eq!(got, [squares(40 + 7 * k), count], "batched Squares #{k}");
    }
    slot.terminate(DEADLINE);
}

/// A [`Waiter`] over a std channel, for blocking callers.
#[derive(Debug)]
pub struct ChannelWaiter(pub mpsc::SyncSender<Result<Reply, AskError>>);

impl Waiter for ChannelWaiter {
    fn complete(self, outcome: Result<Reply, AskError>) {
        let _ = self.0.send(outcome);
    }
}

/// A pending blocking ask.
#[derive(Debug)]
pub struct Pending(mpsc::Receiver<Result<Reply, AskError>>);

impl Pending {
    /// Waits for the outcome; panics after [`DEADLINE`] (a hung ask).
    pub fn wait(self) -> Result<Reply, AskError> {
        self.0
            .recv_timeout(DEADLINE)
            .expect("an accepted ask never resolved: the caller would hang")
    }
}

/// Sends an ask, retrying while the ring is full.
///
/// # Panics
/// If the slot refuses the message for another reason than `Full`.
pub fn ask(slot: &mut GpuSlot<ChannelWaiter>, msg: impl Into<Payload>) -> Pending {
    let (tx, rx) = mpsc::sync_channel(1);
    let mut item = (msg.into(), ChannelWaiter(tx));
    loop {
        match slot.ask(item.0, item.1, ActorId::NONE) {
            Ok(_) => return Pending(rx),
            Err(SubmitError::Full(back)) => {
                item = back;
                std::thread::sleep(Duration::from_micros(20));
            }
            Err(e) => panic!("ask refused: {e:?}"),
        }
    }
}

/// Sends a tell, retrying while the ring is full.
///
/// # Panics
/// If the slot refuses the message for another reason than `Full`.
pub fn tell(slot: &mut GpuSlot<ChannelWaiter>, msg: impl Into<Payload>) {
    let mut payload = msg.into();
    loop {
        match slot.tell(payload, ActorId::NONE) {
            Ok(()) => return,
            Err(SubmitError::Full(back)) => {
                payload = back;
                std::thread::sleep(Duration::from_micros(20));
            }
            Err(e) => panic!("tell refused: {e:?}"),
        }
    }
}

fn launch<K: Kernel>(
    rt: &Runtime,
    opts: &LaunchOptions,
) -> (GpuSlot<ChannelWaiter>, mpsc::Receiver<SlotEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let slot = rt
        .launch::<K, ChannelWaiter>(bytemuck::Zeroable::zeroed(), opts, move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .expect("launch");
    (slot, rx)
}

fn value(r: Result<Reply, AskError>) -> u64 {
    r.expect("reply").decode::<u64>().expect("u64 reply")
}

/// An ask is answered by its handler.
pub fn ask_round_trip(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    for v in [0, 1, u64::MAX] {
        assert_eq!(value(ask(&mut slot, Echo(v)).wait()), v);
    }
    slot.terminate(DEADLINE);
}

/// Tells change the state an ask then reads: the kernel keeps its state.
pub fn tells_and_state_kept(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    for v in 1..=100 {
        tell(&mut slot, Add(v));
    }
    assert_eq!(value(ask(&mut slot, Total()).wait()), 5050);
    tell(&mut slot, Add(1));
    assert_eq!(value(ask(&mut slot, Total()).wait()), 5051);
    slot.terminate(DEADLINE);
}

/// 100 000 messages arrive in the order sent.
pub fn in_order_delivery(rt: &Runtime) {
    let n = 100_000u64;
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default().h2k_capacity(64));
    for i in 0..n {
        tell(&mut slot, Seq(i));
    }
    let report: [u64; 2] = ask(&mut slot, SeqReport())
        .wait()
        .expect("reply")
        .decode()
        .expect("report");
    assert_eq!(report, [n, 0], "[seen, out of order]");
    slot.terminate(DEADLINE);
}

/// Deactivated: tells wait in H2K (depth N, nothing processed); activated:
/// all N are processed.
pub fn deactivate_then_activate(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default().h2k_capacity(256));
    assert_eq!(value(ask(&mut slot, Echo(1)).wait()), 1);
    slot.deactivate().expect("deactivate");
    assert!(
        slot.wait_for_state(LifecycleState::Deactivated, DEADLINE),
        "never acknowledged Deactivated"
    );
    // Read after the acknowledgement: a reply can reach us before the loop
    // records the progress of the message that made it, but the loop acks
    // Deactivated (store-release) only after it has.
    let before = slot.status().processed;
    let n = 100;
    for i in 0..n {
        tell(&mut slot, Add(i));
    }
    let pending = ask(&mut slot, Total());
    assert_eq!(
        slot.h2k_depth(),
        n + 1,
        "messages wait in H2K while deactivated"
    );
    assert_eq!(
        slot.status().processed,
        before,
        "nothing is processed while deactivated"
    );
    slot.activate().expect("activate");
    assert_eq!(value(pending.wait()), (0..n).sum::<u64>());
    // The reply may arrive before the loop records the progress of the
    // message that made it: wait (bounded) for the count.
    let deadline = std::time::Instant::now() + DEADLINE;
    while slot.status().processed < before + n + 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    assert_eq!(slot.status().processed, before + n + 1);
    slot.terminate(DEADLINE);
}

/// Terminating with asks in flight fails every one of them.
pub fn terminate_fails_every_waiter(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default().auto_activate(false));
    let pending: Vec<_> = (0..50).map(|i| ask(&mut slot, Echo(i))).collect();
    let report = slot.terminate(DEADLINE);
    assert!(report.acknowledged);
    assert_eq!(report.failed_asks, 50);
    for p in pending {
        assert_eq!(p.wait(), Err(AskError::Terminated));
    }
    assert!(matches!(
        slot.tell(Add(1).into(), ActorId::NONE),
        Err(SubmitError::Closed(_))
    ));
}

/// A panicking handler faults the slot: its ask and every other in-flight
/// ask fail with the fault, the adapter hears of it, the slot closes.
pub fn handler_panic_faults(rt: &Runtime) {
    let (mut slot, events) = launch::<Probe>(rt, &LaunchOptions::default());
    slot.deactivate().expect("deactivate");
    assert!(slot.wait_for_state(LifecycleState::Deactivated, DEADLINE));
    let boom = ask(&mut slot, Explode());
    let after: Vec<_> = (0..5).map(|i| ask(&mut slot, Echo(i))).collect();
    slot.activate().expect("activate");
    let err = boom.wait().expect_err("a panicking handler cannot reply");
    let AskError::Faulted(fault) = err else {
        panic!("expected a fault, got {err:?}")
    };
    assert_eq!(fault.code, crate::control::FaultCode::HandlerPanic);
    for p in after {
        assert_eq!(p.wait(), Err(AskError::Faulted(fault)));
    }
    assert_eq!(
        events.recv_timeout(DEADLINE).expect("fault event"),
        SlotEvent::Faulted(fault)
    );
    assert!(!slot.is_open());
    assert_eq!(slot.fault(), Some(fault));
    let (msg, _) = match slot.ask(
        Echo(9).into(),
        ChannelWaiter(mpsc::sync_channel(1).0),
        ActorId::NONE,
    ) {
        Err(SubmitError::Closed(back)) => back,
        other => panic!("send to a faulted actor: {other:?}"),
    };
    assert_eq!(
        msg.get::<Echo>(),
        Some(Echo(9)),
        "the message is handed back"
    );
}

/// A handler's fault code becomes the slot's fault detail.
pub fn handler_error_faults(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    let AskError::Faulted(fault) = ask(&mut slot, Fail(42)).wait().expect_err("fault") else {
        panic!("not a fault")
    };
    assert_eq!(
        (fault.code, fault.detail),
        (crate::control::FaultCode::HandlerFault, 42)
    );
}

/// An ask whose handler ends without replying resolves with `NoReply`.
pub fn no_reply(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    assert_eq!(ask(&mut slot, Silent()).wait(), Err(AskError::NoReply));
    assert_eq!(
        value(ask(&mut slot, Echo(5)).wait()),
        5,
        "the actor serves on"
    );
    slot.terminate(DEADLINE);
}

/// Handlers run on the slot's device thread, not the caller's.
pub fn runs_on_the_device_thread(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    let mine = thread_tag(std::thread::current().name().unwrap_or(""));
    let theirs = value(ask(&mut slot, WhereAmI()).wait());
    assert_ne!(theirs, mine);
    assert_ne!(theirs, thread_tag(""), "the device thread is named");
    slot.terminate(DEADLINE);
}

/// Replies deferred and sent in reverse order still reach their own callers.
pub fn deferred_replies_in_reverse_order(rt: &Runtime) {
    let (mut slot, _) = launch::<Reverse>(rt, &LaunchOptions::default());
    for round in 0..4u64 {
        let pending: Vec<_> = (0..REVERSE_BATCH as u64)
            .map(|i| (i, ask(&mut slot, Reversed(round * 100 + i))))
            .collect();
        for (i, p) in pending {
            assert_eq!(value(p.wait()), (round * 100 + i) * 10);
        }
    }
    slot.terminate(DEADLINE);
}

/// A message the kernel does not serve is refused and handed back.
pub fn unknown_type_is_refused(rt: &Runtime) {
    let (mut slot, _) = launch::<Probe>(rt, &LaunchOptions::default());
    match slot.tell(Stray(3).into(), ActorId::NONE) {
        Err(SubmitError::UnknownType { value, type_id }) => {
            assert_eq!(type_id, Stray::TYPE_ID);
            assert_eq!(value.get::<Stray>(), Some(Stray(3)));
        }
        other => panic!("expected UnknownType, got {other:?}"),
    }
    slot.terminate(DEADLINE);
}

/// Collects the `Seq` values delivered to it (a host-side mailbox).
struct Collect(std::sync::Mutex<Vec<u64>>);

impl crate::registry::Mailbox for Collect {
    fn try_deliver(
        &self,
        d: crate::registry::Delivery,
    ) -> Result<(), crate::registry::DeliveryError> {
        let Some(Seq(v)) = d.payload.get::<Seq>() else {
            return Err(crate::registry::DeliveryError::Refused(d));
        };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(v);
        Ok(())
    }
}

/// A kernel's sends reach the actor they name (here a host mailbox in the
/// runtime's registry), each once and in the order sent.
pub fn sends_from_a_kernel_arrive_in_order(rt: &Runtime) {
    let sink = ActorId::cpu(rt.node(), 0xFFF0);
    let got = std::sync::Arc::new(Collect(std::sync::Mutex::new(Vec::new())));
    rt.registry().register(sink, got.clone());
    let (mut relay, _) = launch::<Relay>(rt, &LaunchOptions::default().h2k_capacity(64));
    let n = 2000;
    for i in 0..n {
        tell(&mut relay, Forward(sink.to_bits(), i));
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    let len = || got.0.lock().map_or(0, |v| v.len()) as u64;
    while len() < n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let values = got.0.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(values.len() as u64, n, "every send arrives");
    assert!(
        values.iter().copied().eq(0..n),
        "sends arrive once each, in order"
    );
    relay.terminate(DEADLINE);
    rt.registry().unregister(sink);
}

/// Sends over a K2K link arrive once each, in order, and never through the
/// poller: a relay forwards 3 000 values to a linked receiver over a link
/// of 16 slots (so the sender's outbox fills and it is held until the
/// receiver drains it — backpressure along the link). A backend whose loop
/// does not serve links refuses the link with a typed error instead (the
/// cpu backend must serve them).
pub fn linked_sends_arrive_in_order(rt: &Runtime) {
    let opts = LaunchOptions::default().h2k_capacity(64);
    let (mut relay, _) = launch::<Relay>(rt, &opts);
    let (mut sink, _) = launch::<Probe>(rt, &opts);
    let options = crate::link::LinkOptions::default().capacity(16);
    let link = match rt.connect(relay.id(), sink.id(), options) {
        Ok(link) => link,
        Err(crate::link::ConnectError::Unsupported(backend)) => {
            assert_ne!(backend, crate::kernel::BackendKind::Cpu, "cpu serves links");
            relay.terminate(DEADLINE);
            sink.terminate(DEADLINE);
            return;
        }
        Err(e) => panic!("connect: {e}"),
    };
    let routed = rt.routed_messages();
    let n = 3000;
    for i in 0..n {
        tell(&mut relay, Forward(sink.id().to_bits(), i));
    }
    let deadline = std::time::Instant::now() + DEADLINE;
    let report = loop {
        let report: [u64; 2] = ask(&mut sink, SeqReport())
            .wait()
            .expect("reply")
            .decode()
            .expect("report");
        if report[0] >= n || std::time::Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(report, [n, 0], "[seen, out of order]");
    let stats = rt.link_stats(link).expect("the link is open");
    assert_eq!((stats.sent, stats.consumed, stats.outbox), (n, n, 0));
    assert_eq!(
        rt.routed_messages(),
        routed,
        "no send went through the poller"
    );
    relay.terminate(DEADLINE);
    sink.terminate(DEADLINE);
}

/// The next incarnation of `slot`'s actor after a fault: recovers (its
/// pending messages kept for replay, the poison failed), relaunches, and
/// replays — again if a replayed message faults the new one.
fn restart<K: Kernel>(slot: &mut GpuSlot<ChannelWaiter>, rt: &Runtime, opts: &LaunchOptions) {
    let home = slot.home().clone();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "restart never settled"
        );
        let _ = slot.recover();
        *slot = rt
            .launch_in::<K, ChannelWaiter>(&home, bytemuck::Zeroable::zeroed(), opts, |_| {})
            .expect("relaunch");
        loop {
            match slot.replay() {
                crate::runtime::ReplayStatus::Done => return,
                crate::runtime::ReplayStatus::Full => std::thread::sleep(Duration::from_micros(50)),
                _ => break,
            }
        }
    }
}

/// Waits until `got` holds every value of `0..n` but the poisons,
/// restarting the relay `slot` whenever it is closed, and checks them: each
/// once, in order. Returns the restarts it made.
fn every_value_but_the_poisons(
    got: &Collect,
    n: u64,
    poison: impl Fn(u64) -> bool,
    slot: &mut GpuSlot<ChannelWaiter>,
    rt: &Runtime,
    opts: &LaunchOptions,
) -> usize {
    let want: Vec<u64> = (0..n).filter(|&v| !poison(v)).collect();
    let deadline = std::time::Instant::now() + DEADLINE;
    let len = || got.0.lock().map_or(0, |v| v.len());
    let mut restarts = 0;
    while len() < want.len() && std::time::Instant::now() < deadline {
        if !slot.is_open() {
            restart::<Relay>(slot, rt, opts);
            restarts += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let values = got.0.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(
        values.len(),
        want.len(),
        "every value but the poisons arrives"
    );
    assert!(values == want, "each once, in order");
    restarts
}

/// Faults and restarts lose nothing: a stream of sends through a kernel
/// that faults on every 97th message (a poison), restarted each time as
/// the next incarnation with its pending messages replayed, delivers every
/// other message exactly once, in order — what a device loop commits, and
/// only that, counts.
pub fn faults_and_restarts_lose_nothing(rt: &Runtime) {
    let sink = ActorId::cpu(rt.node(), 0xFFF1);
    let got = std::sync::Arc::new(Collect(std::sync::Mutex::new(Vec::new())));
    rt.registry().register(sink, got.clone());
    let opts = LaunchOptions::default()
        .h2k_capacity(64)
        .on_fault(crate::home::PendingPolicy::Replay);
    let (mut slot, _) = launch::<Relay>(rt, &opts);
    let n = 3000u64;
    let poison = |v: u64| v % 97 == 96;
    let mut restarts = 0;
    for v in 0..n {
        let mut payload: Payload =
            Forward(sink.to_bits(), if poison(v) { v | POISON } else { v }).into();
        loop {
            match slot.tell(payload, ActorId::NONE) {
                Ok(()) => break,
                Err(SubmitError::Full(back)) => {
                    payload = back;
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(SubmitError::Closed(back)) => {
                    payload = back;
                    restart::<Relay>(&mut slot, rt, &opts);
                    restarts += 1;
                }
                Err(e) => panic!("tell refused: {e:?}"),
            }
        }
    }
    restarts += every_value_but_the_poisons(&got, n, poison, &mut slot, rt, &opts);
    assert!(restarts > 0, "the poisons faulted the actor");
    slot.terminate(DEADLINE);
    rt.registry().unregister(sink);
}

/// A receiver restarted over its link carries on where its last
/// incarnation committed: relay `a` forwards 1 500 values over a K2K link
/// to relay `b`, which sends each on to a host mailbox — and faults on
/// every 97th (a poison). Restarted each time under
/// [`Replay`](crate::home::PendingPolicy::Replay), `b` delivers every other
/// value exactly once, in order: the link's commit word, fenced at each
/// fault and reopened for the next incarnation, decides what was served.
/// (Skipped, after checking the typed refusal, where the backend serves no
/// links.)
pub fn a_restarted_receiver_carries_on_over_its_link(rt: &Runtime) {
    let sink = ActorId::cpu(rt.node(), 0xFFF2);
    let got = std::sync::Arc::new(Collect(std::sync::Mutex::new(Vec::new())));
    rt.registry().register(sink, got.clone());
    let opts = LaunchOptions::default()
        .h2k_capacity(64)
        .on_fault(crate::home::PendingPolicy::Replay);
    let (mut a, _) = launch::<Relay>(rt, &opts);
    let (mut b, _) = launch::<Relay>(rt, &opts);
    let options = crate::link::LinkOptions::default().capacity(16);
    let link = match rt.connect(a.id(), b.id(), options) {
        Ok(link) => link,
        Err(e) => {
            assert!(
                matches!(e, crate::link::ConnectError::Unsupported(backend) if backend != crate::kernel::BackendKind::Cpu),
                "connect: {e}"
            );
            a.terminate(DEADLINE);
            b.terminate(DEADLINE);
            rt.registry().unregister(sink);
            return;
        }
    };
    let n = 1500u64;
    let poison = |v: u64| v % 97 == 96;
    let mut restarts = 0;
    let to_b = b.id().to_bits();
    let deadline = std::time::Instant::now() + DEADLINE;
    for v in 0..n {
        let mut payload: Payload =
            Hop(to_b, sink.to_bits(), if poison(v) { v | POISON } else { v }).into();
        loop {
            match a.tell(payload, ActorId::NONE) {
                Ok(()) => break,
                Err(SubmitError::Full(back)) => {
                    // `a` is held while its link is full and `b` is down.
                    payload = back;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the relay stayed full at {v}: delivered {}, restarts {restarts}, b open {}, {:?}",
                        got.0.lock().map_or(0, |v| v.len()),
                        b.is_open(),
                        rt.link_stats(link),
                    );
                    if !b.is_open() {
                        restart::<Relay>(&mut b, rt, &opts);
                        restarts += 1;
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(e) => panic!("tell refused: {e:?}"),
            }
        }
    }
    restarts += every_value_but_the_poisons(&got, n, poison, &mut b, rt, &opts);
    assert!(restarts > 0, "the poisons faulted the receiver");
    a.terminate(DEADLINE);
    b.terminate(DEADLINE);
    rt.registry().unregister(sink);
}

/// One conformance check.
pub type Check = fn(&Runtime);

/// Every check, by name.
pub const ALL: &[(&str, Check)] = &[
    ("ask_round_trip", ask_round_trip),
    ("tells_and_state_kept", tells_and_state_kept),
    ("in_order_delivery", in_order_delivery),
    ("deactivate_then_activate", deactivate_then_activate),
    ("terminate_fails_every_waiter", terminate_fails_every_waiter),
    ("handler_panic_faults", handler_panic_faults),
    ("handler_error_faults", handler_error_faults),
    ("no_reply", no_reply),
    ("runs_on_the_device_thread", runs_on_the_device_thread),
    (
        "deferred_replies_in_reverse_order",
        deferred_replies_in_reverse_order,
    ),
    ("unknown_type_is_refused", unknown_type_is_refused),
    (
        "sends_from_a_kernel_arrive_in_order",
        sends_from_a_kernel_arrive_in_order,
    ),
    (
        "faults_and_restarts_lose_nothing",
        faults_and_restarts_lose_nothing,
    ),
    ("linked_sends_arrive_in_order", linked_sends_arrive_in_order),
    (
        "a_restarted_receiver_carries_on_over_its_link",
        a_restarted_receiver_carries_on_over_its_link,
    ),
    (
        "wide_handlers_share_each_message",
        wide_handlers_share_each_message,
    ),
];
