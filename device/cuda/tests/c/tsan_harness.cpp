// The actor-host device loop (kernels/rk_loop.cuh, compiled as host C++
// exactly as the c-host backend compiles it) against a host side written
// here in C++ with the same atomics the Rust runtime uses — so that gcc's
// ThreadSanitizer sees both sides of every ring, the control block, the
// commit word and the slot descriptor. Built and run by tests/tsan.rs
// (`-fsanitize=thread`); exits non-zero on a wrong result.
//
// Phase 1: a producer thread sends N messages (every 3rd an ask) to a fold
// kernel (s = s * 31 + m, order-sensitive); a poller thread drains K2H and
// checks every reply against the fold computed here. Phase 2: the host
// fences the incarnation while messages flow and checks the loop stops
// without publishing past its commit. Phase 3: the block is reassigned a
// new incarnation (dormant block reuse) and serves again. The block has 4
// threads: in phases 1-3 (width 1) the other three wait at the barrier;
// phase 4 assigns a kernel of width 4 — thread 0 hands each message to the
// others through the block's shared memory, each adds its part to the
// scratch, a barrier, thread 0 folds them into the state — so the
// sanitizer checks the hand-over, the scratch and the state. Phase 5: K2K
// served in place — a second block runs a relay whose every message is a
// send over a link of 16 slots into the first block's fold (backpressure:
// the relay takes a message only while the link has room); the host
// rewrites both link tables (seqlock) while the stream runs, the fold must
// come out in order, and closing the link (the `publishing` handshake)
// leaves the later sends routed through the relay's K2H.

#include "ringkernel_protocol.h"
#include "rk_arch_host.h"
#include "rk_device.cuh"

namespace rk_k0 {
struct Fold {
    uint64_t s, count;
};
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    Fold* f = (Fold*)state;
    f->s = f->s * 31 + rk_get_u64(payload, 0);
    f->count += 1;
    if (msg->flags & RK_FLAG_ASK) return rk_reply_bytes(reply, f, 16);
    return RK_DONE;
}
}  // namespace rk_k0

namespace rk_k1 {
// Thread t adds m * (t + 1); thread 0 folds the sum: s = s * 31 + 10 m.
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    uint64_t* part = (uint64_t*)rk_scratch();
    uint32_t t = rk_thread();
    part[t] = rk_get_u64(payload, 0) * (t + 1);
    rk_sync();
    uint32_t status = RK_DONE;
    if (t == 0) {
        uint64_t sum = 0;
        for (uint32_t k = 0; k < rk_threads(); ++k) sum += part[k];
        rk_k0::Fold* f = (rk_k0::Fold*)state;
        f->s = f->s * 31 + sum;
        f->count += 1;
        if (msg->flags & RK_FLAG_ASK) status = rk_reply_bytes(reply, f, 16);
    }
    rk_sync();
    return status;
}
}  // namespace rk_k1

// The actor the relay sends to (index 9, incarnation 5).
static const uint64_t RECEIVER = (9ull << 16) | 5ull;

namespace rk_k2 {
// Relays each message's value to RECEIVER.
RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg, const uint8_t* payload,
                             rk_reply* reply, rk_later* later) {
    uint64_t v = rk_get_u64(payload, 0);
    return rk_send(later, RECEIVER, 1u, &v, 8) ? RK_DONE : RK_PANIC;
}
}  // namespace rk_k2

#define RK_LATER_CAP 1u
RK_DEVICE uint32_t rk_max_later(uint32_t kernel) { return kernel == 2 ? 1u : 0u; }
RK_DEVICE uint32_t rk_dispatch(uint32_t kernel, void* s, const rk_envelope_header* m,
                               const uint8_t* p, rk_reply* r, rk_later* l) {
    if (kernel == 2) return rk_k2::rk_handle(s, m, p, r, l);
    return kernel == 1 ? rk_k1::rk_handle(s, m, p, r, l) : rk_k0::rk_handle(s, m, p, r, l);
}

#include "rk_loop.cuh"
#include "rk_actor_host.cuh"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#define CHECK(c)                                                           \
    do {                                                                   \
        if (!(c)) {                                                        \
            std::fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); \
            std::exit(1);                                                  \
        }                                                                  \
    } while (0)

static const uint32_t CAP = 64, SLOT = 128, FOLD = 1;

struct Ring {
    uint8_t* mem;
    rk_ring_header* h;
    explicit Ring(uint32_t cap) {
        mem = (uint8_t*)aligned_alloc(128, RK_RING_HEADER_SIZE + cap * SLOT);
        std::memset(mem, 0, RK_RING_HEADER_SIZE + cap * SLOT);
        h = (rk_ring_header*)mem;
        h->magic = RK_RING_MAGIC;
        h->version = RK_RING_VERSION;
        h->capacity = cap;
        h->slot_size = SLOT;
    }
    ~Ring() { free(mem); }
    uint8_t* slot(uint64_t c) { return mem + RK_RING_HEADER_SIZE + (c % h->capacity) * SLOT; }
};

static void idle(void*, uint32_t ns) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(ns < 200000 ? ns : 200000));
}

struct Slot {
    rk_control_block* c;
    Ring h2k{CAP}, k2h{CAP};
    alignas(16) uint64_t state[2] = {0, 0};
    uint32_t served[1] = {FOLD};
    Slot() {
        c = (rk_control_block*)aligned_alloc(128, sizeof(rk_control_block));
        std::memset(c, 0, sizeof(*c));
        c->magic = RK_CONTROL_MAGIC;
        c->version = RK_CONTROL_VERSION;
    }
    ~Slot() { free(c); }
    void assign(rk_slot_desc* d, uint32_t incarnation, uint32_t kernel = 0, uint32_t width = 1,
                rk_link_table* links = nullptr) {
        // The block is dormant: acquire its last `finished`.
        CHECK(__atomic_load_n(&d->finished, __ATOMIC_ACQUIRE) == __atomic_load_n(&d->assigned, __ATOMIC_RELAXED));
        __atomic_store_n(&c->incarnation, incarnation, __ATOMIC_RELAXED);
        __atomic_store_n(&c->commit, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&c->requested_state, (uint32_t)RK_STATE_ACTIVE, __ATOMIC_RELEASE);
        d->control = (uint64_t)c;
        d->h2k = (uint64_t)h2k.mem;
        d->k2h = (uint64_t)k2h.mem;
        d->state = (uint64_t)state;
        d->state_bytes = sizeof(state);
        d->served = (uint64_t)served;
        d->n_served = 1;
        d->kernel = kernel;
        d->width = width;
        d->domain = 7;
        d->hlc = 0;
        d->links = (uint64_t)links;
        __atomic_store_n(&d->assigned, __atomic_load_n(&d->assigned, __ATOMIC_RELAXED) + 1,
                         __ATOMIC_RELEASE);
    }
    // Sends message `seq` (1-based) carrying `m`; false when H2K is full.
    bool send(uint64_t seq, uint64_t m, bool ask) {
        uint64_t tail = __atomic_load_n(&h2k.h->tail, __ATOMIC_RELAXED);
        if (tail - __atomic_load_n(&h2k.h->head, __ATOMIC_ACQUIRE) >= CAP) return false;
        rk_envelope_header e = {};
        e.magic = RK_ENVELOPE_MAGIC;
        e.version = RK_PROTOCOL_VERSION;
        e.flags = ask ? RK_FLAG_ASK : 0;
        e.type_id = FOLD;
        e.payload_len = 8;
        e.correlation = ask ? seq : 0;
        e.src = 1;
        e.dst = 2;
        e.hlc = seq << 4;
        e.seq = seq;
        uint8_t* s = h2k.slot(tail);
        rk_copy(s, &e, sizeof(e));
        rk_copy(s + RK_HEADER_SIZE, &m, 8);
        __atomic_store_n(&h2k.h->tail, tail + 1, __ATOMIC_RELEASE);
        // The waker's side of the doorbell handshake.
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        (void)__atomic_load_n(&c->doorbell, __ATOMIC_RELAXED);
        return true;
    }
    // Takes one K2H envelope, if any.
    bool recv(rk_envelope_header* e, uint8_t* payload) {
        uint64_t head = __atomic_load_n(&k2h.h->head, __ATOMIC_RELAXED);
        if (head == __atomic_load_n(&k2h.h->tail, __ATOMIC_ACQUIRE)) return false;
        rk_copy(e, k2h.slot(head), sizeof(*e));
        rk_copy(payload, k2h.slot(head) + RK_HEADER_SIZE, 16);
        __atomic_store_n(&k2h.h->head, head + 1, __ATOMIC_RELEASE);
        return true;
    }
    uint32_t acked() { return __atomic_load_n(&c->acked_state, __ATOMIC_ACQUIRE); }
};

static uint64_t value(uint64_t i) { return i * 2654435761u; }

// The host's side of a clock reading (what the cuda backend recalibrates
// `clock_offset` with): a new request, then the answer and its sample.
static void clock_exchange(rk_slot_desc* d) {
    uint32_t want = __atomic_load_n(&d->clock_request, __ATOMIC_RELAXED) + 1;
    uint64_t before = rk_device_time_ns();
    __atomic_store_n(&d->clock_request, want, __ATOMIC_RELEASE);
    while (__atomic_load_n(&d->clock_answer, __ATOMIC_ACQUIRE) != want) std::this_thread::yield();
    uint64_t sample = __atomic_load_n(&d->clock_sample, __ATOMIC_RELAXED);
    CHECK(sample >= before && sample <= rk_device_time_ns());
}

int main() {
    alignas(128) static rk_slot_desc desc;
    rk_host_hooks hooks = {nullptr, nullptr, nullptr, idle};
    desc.hooks = (uint64_t)&hooks;
    std::thread block([] { rk_host_block_run(&desc, 4); });

    const uint64_t N = 200000;
    Slot a;
    a.assign(&desc, 1);
    std::thread producer([&] {
        for (uint64_t i = 1; i <= N;) {
            if (a.send(i, value(i), i % 3 == 0)) ++i;
            else std::this_thread::yield();
        }
    });
    uint64_t s = 0, count = 0, replies = 0, next_ask = 3, last_hlc = 0;
    while (replies < N / 3) {
        rk_envelope_header e;
        uint64_t p[2];
        if (!a.recv(&e, (uint8_t*)p)) {
            std::this_thread::yield();
            continue;
        }
        CHECK(e.magic == RK_ENVELOPE_MAGIC && e.flags == RK_FLAG_REPLY && e.type_id == FOLD);
        CHECK(e.correlation == next_ask && e.seq == next_ask && e.src == 2 && e.dst == 1);
        CHECK(e.hlc > (next_ask << 4) && e.hlc > last_hlc && e.clock_domain == 7);
        last_hlc = e.hlc;
        while (count < next_ask) s = s * 31 + value(++count);
        CHECK(p[0] == s && p[1] == count);
        replies += 1;
        next_ask += 3;
        // A clock reading while the slot is busy.
        if (replies == N / 6) clock_exchange(&desc);
    }
    producer.join();
    // Every message committed and released, progress recorded.
    while (__atomic_load_n(&a.c->processed, __ATOMIC_ACQUIRE) < N) std::this_thread::yield();
    CHECK(__atomic_load_n(&a.c->commit, __ATOMIC_ACQUIRE) >> 1 == N);
    CHECK(__atomic_load_n(&a.h2k.h->head, __ATOMIC_ACQUIRE) == N);
    // Terminate: the loop acknowledges and the block goes dormant.
    __atomic_store_n(&a.c->requested_state, (uint32_t)RK_STATE_TERMINATED, __ATOMIC_RELEASE);
    while (a.acked() != RK_STATE_TERMINATED) std::this_thread::yield();
    while (__atomic_load_n(&desc.finished, __ATOMIC_ACQUIRE) != 1) std::this_thread::yield();
    // And one while the block is dormant.
    clock_exchange(&desc);

    // Phase 2: a fence while messages flow.
    Slot b;
    b.assign(&desc, 2);
    std::atomic<bool> stop{false};
    std::thread flood([&] {
        for (uint64_t i = 1; !stop.load(std::memory_order_relaxed);) {
            if (b.send(i, value(i), true)) ++i;
            else std::this_thread::yield();
        }
    });
    uint64_t seen = 0, last = 0;
    while (seen < 1000) {
        rk_envelope_header e;
        uint64_t p[2];
        if (b.recv(&e, (uint8_t*)p)) {
            CHECK(e.seq == last + 1);
            last = e.seq;
            ++seen;
        }
    }
    uint64_t fenced = __atomic_fetch_or(&b.c->commit, RK_COMMIT_FENCED, __ATOMIC_ACQ_REL) >> 1;
    while (b.acked() != RK_STATE_TERMINATED) {
        rk_envelope_header e;
        uint64_t p[2];
        if (b.recv(&e, (uint8_t*)p)) last = e.seq;
    }
    stop.store(true, std::memory_order_relaxed);
    flood.join();
    rk_envelope_header e;
    uint64_t p[2];
    while (b.recv(&e, (uint8_t*)p)) last = e.seq;
    uint64_t committed = __atomic_load_n(&b.c->commit, __ATOMIC_ACQUIRE) >> 1;
    // Nothing commits after the fence; H2K is released only to the commit;
    // replies past it are at most the one batch that lost its CAS.
    CHECK(committed == fenced);
    CHECK(__atomic_load_n(&b.h2k.h->head, __ATOMIC_ACQUIRE) == committed);
    CHECK(last <= committed + RK_BATCH);
    while (__atomic_load_n(&desc.finished, __ATOMIC_ACQUIRE) != 2) std::this_thread::yield();

    // Phase 3: the dormant block serves a new incarnation.
    Slot c;
    c.assign(&desc, 3);
    CHECK(c.send(1, 5, true));
    while (!c.recv(&e, (uint8_t*)p)) std::this_thread::yield();
    CHECK(p[0] == 5 && p[1] == 1 && e.correlation == 1);
    __atomic_store_n(&c.c->requested_state, (uint32_t)RK_STATE_TERMINATED, __ATOMIC_RELEASE);
    while (c.acked() != RK_STATE_TERMINATED) std::this_thread::yield();
    while (__atomic_load_n(&desc.finished, __ATOMIC_ACQUIRE) != 3) std::this_thread::yield();

    // Phase 4: a kernel of width 4 on the block's four threads.
    Slot w;
    w.assign(&desc, 4, 1, 4);
    const uint64_t W = 3000;
    std::thread wide_producer([&] {
        for (uint64_t i = 1; i <= W;) {
            if (w.send(i, value(i), i % 3 == 0)) ++i;
            else std::this_thread::yield();
        }
    });
    uint64_t ws = 0, wcount = 0, wreplies = 0;
    for (uint64_t next = 3; next <= W; next += 3) {
        while (!w.recv(&e, (uint8_t*)p)) std::this_thread::yield();
        CHECK(e.correlation == next && e.flags == RK_FLAG_REPLY);
        while (wcount < next) ws = ws * 31 + 10 * value(++wcount);
        CHECK(p[0] == ws && p[1] == wcount);
        wreplies += 1;
    }
    wide_producer.join();
    __atomic_store_n(&w.c->requested_state, (uint32_t)RK_STATE_TERMINATED, __ATOMIC_RELEASE);
    while (w.acked() != RK_STATE_TERMINATED) std::this_thread::yield();

    while (__atomic_load_n(&desc.finished, __ATOMIC_ACQUIRE) != 4) std::this_thread::yield();

    // Phase 5: K2K in place, relay (second block) -> link -> fold (first).
    const uint32_t LCAP = 16;
    Ring link_ring{LCAP};
    rk_link_control* lc = (rk_link_control*)aligned_alloc(128, sizeof(rk_link_control));
    std::memset(lc, 0, sizeof(*lc));
    lc->magic = RK_LINK_MAGIC;
    lc->version = RK_LINK_VERSION;
    lc->capacity = LCAP;
    lc->commit = 5ull << 48;  // open for the receiver's incarnation 5
    static const uint32_t link_served[1] = {FOLD};
    auto* tables = (rk_link_table*)aligned_alloc(128, 2 * sizeof(rk_link_table));
    std::memset(tables, 0, 2 * sizeof(rk_link_table));
    rk_link_table* out_table = &tables[0];
    rk_link_table* in_table = &tables[1];
    // The host's side of the seqlock: an odd generation, the rows, even.
    auto write_tables = [&] {
        for (rk_link_table* t : {out_table, in_table}) {
            uint64_t g = __atomic_load_n(&t->generation, __ATOMIC_RELAXED);
            __atomic_store_n(&t->generation, g | 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            rk_link_row* row = (rk_link_row*)((uint8_t*)t + RK_LINK_TABLE_ROWS_AT);
            bool out = t == out_table;
            if (out) row += RK_MAX_SLOT_LINKS;
            __atomic_store_n(&row->control, (uint64_t)lc, __ATOMIC_RELAXED);
            __atomic_store_n(&row->ring, (uint64_t)link_ring.mem, __ATOMIC_RELAXED);
            __atomic_store_n(&row->peer, out ? RECEIVER & ~0xFFFFull : 8ull << 16, __ATOMIC_RELAXED);
            __atomic_store_n(&row->served, (uint64_t)link_served, __ATOMIC_RELAXED);
            __atomic_store_n(&row->n_served, 1u, __ATOMIC_RELAXED);
            __atomic_store_n(&row->id, 5u, __ATOMIC_RELAXED);
            __atomic_store_n(&row->flags, 0u, __ATOMIC_RELAXED);
            __atomic_store_n(&row->capacity, LCAP, __ATOMIC_RELAXED);
            __atomic_store_n(out ? &t->n_out : &t->n_in, 1u, __ATOMIC_RELAXED);
            __atomic_store_n(&t->generation, (g | 1) + 1, __ATOMIC_RELEASE);
        }
    };
    write_tables();
    alignas(128) static rk_slot_desc desc2;
    desc2.hooks = (uint64_t)&hooks;
    std::thread block2([] { rk_host_block_run(&desc2, 1); });
    Slot fold, relay;
    fold.assign(&desc, 5, 0, 1, in_table);
    relay.assign(&desc2, 1, 2, 1, out_table);
    const uint64_t K = 20000;
    std::thread relay_producer([&] {
        for (uint64_t i = 1; i <= K;) {
            if (relay.send(i, value(i), false)) ++i;
            else std::this_thread::yield();
        }
    });
    // Rewrites while the stream runs (the same rows: the loops must carry
    // on exactly where they were).
    for (int k = 0; k < 50; ++k) {
        write_tables();
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    relay_producer.join();
    while (__atomic_load_n(&fold.c->processed, __ATOMIC_ACQUIRE) < K) std::this_thread::yield();
    CHECK(__atomic_load_n(&relay.c->processed, __ATOMIC_ACQUIRE) == K);
    CHECK(__atomic_load_n(&link_ring.h->tail, __ATOMIC_ACQUIRE) == K);
    CHECK((__atomic_load_n(&lc->commit, __ATOMIC_ACQUIRE) >> 1 & ((1ull << 47) - 1)) == K);
    CHECK(__atomic_load_n(&out_table->seen, __ATOMIC_ACQUIRE) ==
          __atomic_load_n(&out_table->generation, __ATOMIC_RELAXED));
    CHECK(fold.send(1, 0, true));
    while (!fold.recv(&e, (uint8_t*)p)) std::this_thread::yield();
    uint64_t ks = 0;
    for (uint64_t i = 1; i <= K; ++i) ks = ks * 31 + value(i);
    ks = ks * 31;  // the ask's own value, 0
    CHECK(p[0] == ks && p[1] == K + 1);
    // Close the link as the host does: `closed`, then wait out a publish.
    __atomic_fetch_or(&lc->closed, RK_LINK_RECEIVER_GONE, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&lc->publishing, __ATOMIC_SEQ_CST) != 0) std::this_thread::yield();
    uint64_t closed_tail = __atomic_load_n(&link_ring.h->tail, __ATOMIC_ACQUIRE);
    const uint64_t R = 100;
    for (uint64_t i = K + 1; i <= K + R;) {
        if (relay.send(i, value(i), false)) ++i;
        else std::this_thread::yield();
    }
    // Routed now: sends in the relay's K2H, each naming the H2K message.
    for (uint64_t i = K + 1; i <= K + R; ++i) {
        while (!relay.recv(&e, (uint8_t*)p)) std::this_thread::yield();
        CHECK(e.flags == 0 && e.dst == RECEIVER && e.seq == i && p[0] == value(i));
    }
    CHECK(__atomic_load_n(&link_ring.h->tail, __ATOMIC_ACQUIRE) == closed_tail);
    for (Slot* x : {&fold, &relay}) {
        __atomic_store_n(&x->c->requested_state, (uint32_t)RK_STATE_TERMINATED, __ATOMIC_RELEASE);
        while (x->acked() != RK_STATE_TERMINATED) std::this_thread::yield();
    }
    __atomic_store_n(&desc2.exit, 1, __ATOMIC_RELEASE);
    block2.join();
    free(tables);
    free(lc);

    __atomic_store_n(&desc.exit, 1, __ATOMIC_RELEASE);
    block.join();
    std::printf("ok: %llu messages, %llu replies checked; fenced at %llu, last reply %llu; "
                "width 4: %llu replies checked; K2K: %llu sends folded in order\n",
                (unsigned long long)N, (unsigned long long)replies, (unsigned long long)fenced,
                (unsigned long long)last, (unsigned long long)wreplies, (unsigned long long)K);
    return 0;
}
