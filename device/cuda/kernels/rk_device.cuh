// ringkernel — what a CUDA handler sees, and the slot descriptor the host
// hands the actor-host loop. Included after ringkernel_protocol.h and one
// of rk_arch_cuda.cuh / rk_arch_host.h (see the crate docs for the order).
//
// The handler's contract (one per kernel type, in its own namespace):
//
//   RK_DEVICE uint32_t rk_handle(void* state, const rk_envelope_header* msg,
//                                const uint8_t* payload, rk_reply* reply,
//                                rk_later* later);
//
// Helper functions of a handler need no annotation: the backend's NVRTC
// compiles device code by default (--device-as-default-execution-space).
//
// `state` is the kernel's State (16-byte aligned, kept between messages);
// `payload` holds msg->payload_len bytes. It returns RK_DONE, RK_REPLIED
// (`reply` filled), RK_DEFERRED (the ask is answered by a later run),
// RK_FAULT + code, or RK_PANIC. Any run may also answer asks deferred
// earlier, and send tells to other actors: up to `later->cap` envelopes in
// all, through rk_later_push (addressed by the correlation id and sender
// the handler kept) and rk_send. Messages of one actor are handled one at
// a time, in order.
//
// Width: a kernel of declared width 1 runs on the slot's thread 0. A wider
// one (Width::Warp, Width::Block(w): w a multiple of 32, at most the
// block's threads) runs each message on the block's first w threads: all
// of them call rk_handle with the same message and state, and thread 0's
// return value, reply and later entries are the run's (the others' are
// dropped). Inside, rk_thread() and rk_threads() give the thread's index
// and w, rk_sync() is a barrier among the w (every one of them must reach
// it equally often), and rk_scratch() is RK_SCRATCH_BYTES the block's
// threads share (CUDA shared memory). The state is shared too: write
// disjoint parts of it, or write it from one thread, with rk_sync() between.
// Every one of the w threads must call rk_sync() equally often and return
// (a thread that returns early while others wait in rk_sync() hangs the
// slot: the watchdog then faults it); __syncthreads() and barriers 0 and 1
// are the loop's, not the handler's. Only thread 0's status counts: a
// fault must be returned by thread 0.
#pragma once

#define RK_DONE 0u
#define RK_REPLIED 1u
#define RK_DEFERRED 2u
#define RK_FAULT 0x100u
// The handler aborts (what a panic is on the cpu backend).
#define RK_PANIC 0xFFFFFFFFu
// A reply longer than RK_MAX_INLINE, or more later replies than declared.
#define RK_REPLY_TOO_LARGE 0xFFFFFFFEu
// The HandlerFault detail of RK_REPLY_TOO_LARGE (as the wgpu backend's).
#define RK_DETAIL_REPLY_TOO_LARGE 0x300000000ull
// BadEnvelope details the loop reports for its own inputs.
#define RK_DETAIL_BAD_RING 0xB0000001ull
#define RK_DETAIL_BAD_STATE_WORD 0xFFFFFFFFFFFFFFFFull
// A slot width the block cannot run (more than its threads).
#define RK_DETAIL_BAD_WIDTH 0xB0000002ull
// The block's other threads could not be started (c-host: the system
// refused a thread).
#define RK_DETAIL_NO_THREADS 0xB0000003ull

typedef struct rk_reply {
    uint32_t len;
    uint32_t _pad;
    RK_ALIGNAS(8) uint8_t payload[RK_MAX_INLINE];
} rk_reply;

typedef struct rk_later_reply {
    uint64_t correlation;
    uint64_t dst;
    uint32_t type_id;
    uint32_t len;
    RK_ALIGNAS(8) uint8_t payload[RK_MAX_INLINE];
} rk_later_reply;

typedef struct rk_later {
    uint32_t n;
    uint32_t cap;
    rk_later_reply* replies;
} rk_later;

// ---- the block's shared memory (wide handlers) ----

#define RK_SCRATCH_BYTES 4096u
// What thread 0 tells the block's other threads.
#define RK_CMD_HANDLE 1u
#define RK_CMD_EXIT 2u

// Written by thread 0, read by the others after a barrier.
typedef struct rk_block_shared {
    uint32_t cmd;
    uint32_t kernel;
    uint32_t width;  // threads running the slot's handler
    uint32_t _pad;
    void* state;
    rk_envelope_header msg;
    RK_ALIGNAS(16) uint8_t payload[RK_MAX_INLINE];
    RK_ALIGNAS(16) uint8_t scratch[RK_SCRATCH_BYTES];
} rk_block_shared;

#ifdef RK_ARCH_CUDA
__shared__ rk_block_shared rk_shared_block;
RK_DEVICE rk_block_shared* rk_block(void) { return &rk_shared_block; }
#else
// Set per block thread by rk_host_block_run; a loop run without it (one
// thread) gets its own.
static thread_local rk_block_shared* rk_tls_shared = nullptr;
RK_DEVICE rk_block_shared* rk_block(void) {
    if (!rk_tls_shared) {
        static thread_local rk_block_shared own;
        own.width = 1;
        rk_tls_shared = &own;
    }
    return rk_tls_shared;
}
#endif

// The calling thread's index in its run (0 .. rk_threads()).
RK_DEVICE uint32_t rk_thread(void) { return rk_arch_thread(); }
// The threads running this handler (the kernel's declared width).
RK_DEVICE uint32_t rk_threads(void) { return rk_block()->width; }
// A barrier among the threads running this handler.
RK_DEVICE void rk_sync(void) {
    uint32_t w = rk_block()->width;
    if (w > 1) rk_arch_sync(w);
}
// RK_SCRATCH_BYTES the block's threads share (16-byte aligned).
RK_DEVICE uint8_t* rk_scratch(void) { return rk_block()->scratch; }

// One actor slot of the actor-host kernel, in memory both sides see. The
// host fills the fields, then store-releases `assigned` (a new generation);
// the slot's block serves it until the incarnation ends and store-releases
// `finished` with that generation. Mirrored by `SlotDesc` in Rust; offsets
// asserted on both sides.
typedef struct rk_slot_desc {
    RK_ALIGNAS(128) uint64_t control; /* rk_control_block* */
    uint64_t h2k;                     /* rk_ring_header* (consumed here) */
    uint64_t k2h;                     /* rk_ring_header* (produced here) */
    uint64_t state;                   /* the kernel's State bytes */
    uint64_t served;                  /* const uint32_t[n_served], sorted */
    uint64_t hooks;                   /* c-host: rk_host_hooks*; CUDA: 0 */
    uint32_t n_served;
    uint32_t kernel;                  /* index of the kernel's handler */
    uint32_t domain;                  /* clock domain of what it stamps */
    uint32_t state_bytes;
    int64_t clock_offset;             /* host ns - device ns (host, relaxed) */
    uint64_t hlc;                     /* the slot's HLC word (device) */
    uint64_t assigned;                /* host: generation, store-release */
    uint64_t finished;                /* device: generation, store-release */
    uint64_t exit;                    /* host: nonzero = the block returns */
    uint32_t width;                   /* threads per message (the kernel's) */
    uint32_t clock_request;           /* host: a sample wanted (store-release) */
    uint64_t clock_sample;            /* device: its clock, in answer (relaxed) */
    uint32_t clock_answer;            /* device: the request answered (store-release) */
    uint8_t _pad[4];
    uint64_t links;                   /* rk_link_table* (0: none; host rewrites it, seqlock) */
    uint64_t self_id;                 /* the actor's id bits (the src of what it sends) */
    uint8_t _pad2[112];
} rk_slot_desc;
RK_STATIC_ASSERT(sizeof(rk_slot_desc) == 256, "sizeof rk_slot_desc");
RK_ASSERT_OFFSET(rk_slot_desc, n_served, 48);
RK_ASSERT_OFFSET(rk_slot_desc, clock_offset, 64);
RK_ASSERT_OFFSET(rk_slot_desc, hlc, 72);
RK_ASSERT_OFFSET(rk_slot_desc, assigned, 80);
RK_ASSERT_OFFSET(rk_slot_desc, finished, 88);
RK_ASSERT_OFFSET(rk_slot_desc, exit, 96);
RK_ASSERT_OFFSET(rk_slot_desc, width, 104);
RK_ASSERT_OFFSET(rk_slot_desc, clock_request, 108);
RK_ASSERT_OFFSET(rk_slot_desc, clock_sample, 112);
RK_ASSERT_OFFSET(rk_slot_desc, clock_answer, 120);
RK_ASSERT_OFFSET(rk_slot_desc, links, 128);
RK_ASSERT_OFFSET(rk_slot_desc, self_id, 136);

// ---- helpers for handlers ----

RK_DEVICE uint64_t rk_get_u64(const uint8_t* payload, uint32_t at) {
    uint64_t v;
    rk_copy(&v, payload + at, 8);
    return v;
}

RK_DEVICE uint32_t rk_get_u32(const uint8_t* payload, uint32_t at) {
    uint32_t v;
    rk_copy(&v, payload + at, 4);
    return v;
}

// Replies with `len` bytes of `v`.
RK_DEVICE uint32_t rk_reply_bytes(rk_reply* reply, const void* v, uint32_t len) {
    if (len > RK_MAX_INLINE) return RK_REPLY_TOO_LARGE;
    rk_copy(reply->payload, v, len);
    reply->len = len;
    return RK_REPLIED;
}

RK_DEVICE uint32_t rk_reply_u64(rk_reply* reply, uint64_t v) {
    return rk_reply_bytes(reply, &v, 8);
}

// Queues a reply to an ask deferred earlier; false when `later` is full or
// the payload too large (nothing queued).
RK_DEVICE bool rk_later_push(rk_later* later, uint64_t correlation, uint64_t dst,
                             uint32_t type_id, const void* v, uint32_t len) {
    if (later->n >= later->cap || len > RK_MAX_INLINE) return false;
    rk_later_reply* r = &later->replies[later->n];
    r->correlation = correlation;
    r->dst = dst;
    r->type_id = type_id;
    r->len = len;
    rk_copy(r->payload, v, len);
    later->n += 1;
    return true;
}

// Sends a tell to actor `dst` (an ActorId's bits): the host routes it once
// this message commits, in order with this actor's other sends. It shares
// `later`'s room (a send is an entry with correlation 0); false when full,
// too large, or `dst` is 0.
RK_DEVICE bool rk_send(rk_later* later, uint64_t dst, uint32_t type_id, const void* v,
                       uint32_t len) {
    return dst != 0 && rk_later_push(later, 0, dst, type_id, v, len);
}

// FNV-1a of a NUL-terminated string (the conformance kernels' WhereAmI).
RK_DEVICE uint64_t rk_fnv1a(const char* s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; ++s) h = (h ^ (uint64_t)(uint8_t)*s) * 0x100000001b3ull;
    return h;
}
