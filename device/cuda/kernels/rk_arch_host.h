// ringkernel — the device intrinsics of the actor-host loop, for host C++:
// the c-host backend compiles the very loop nvcc compiles (rk_loop.cuh)
// against these, so the protocol code is executed on machines without a
// GPU (and under ThreadSanitizer). Same names and meanings as
// rk_arch_cuda.cuh, over the GCC/Clang __atomic builtins — the same C++11
// atomics Rust's AtomicU64 are, on the same addresses.
#pragma once

#include <condition_variable>
#include <cstring>
#include <ctime>
#include <mutex>
#include <thread>
#include <vector>

#define RK_ARCH_HOST 1
#define RK_DEVICE static inline
#define RK_LOOP_NAME "ringkernel-c-host"

RK_DEVICE uint64_t rk_ld_acquire_u64(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
RK_DEVICE uint32_t rk_ld_acquire_u32(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
RK_DEVICE void rk_st_release_u64(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
RK_DEVICE void rk_st_release_u32(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
RK_DEVICE uint64_t rk_ld_relaxed_u64(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
RK_DEVICE uint32_t rk_ld_relaxed_u32(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
RK_DEVICE void rk_st_relaxed_u64(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
RK_DEVICE void rk_st_relaxed_u32(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
RK_DEVICE bool rk_cas_release_u64(uint64_t* p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELEASE,
                                       __ATOMIC_RELAXED);
}
RK_DEVICE void rk_fence_sc(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

RK_DEVICE uint64_t rk_device_time_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// The block's threads: one OS thread per device thread of the block
// (rk_host_block_run runs thread 0; the others start when the block is
// first assigned a wide kernel, so a block serving width-1 kernels stays
// one thread). A barrier is a mutex and a condition variable, which
// ThreadSanitizer sees as the synchronisation it is.
struct rk_host_barrier {
    std::mutex m;
    std::condition_variable cv;
    uint32_t arrived = 0;
    uint64_t generation = 0;
    uint32_t expected = 0;
    void arrive(std::unique_lock<std::mutex>& lock, uint32_t count) {
        uint64_t g = generation;
        if (++arrived >= count) {
            arrived = 0;
            generation += 1;
            cv.notify_all();
            return;
        }
        cv.wait(lock, [&] { return generation != g; });
    }
    // Waits until `count` threads (the same count for all) have arrived.
    void wait(uint32_t count) {
        std::unique_lock<std::mutex> lock(m);
        arrive(lock, count);
    }
    // Waits until `expected` threads have arrived.
    void wait_expected() {
        std::unique_lock<std::mutex> lock(m);
        arrive(lock, expected);
    }
    void expect(uint32_t n) {
        std::lock_guard<std::mutex> lock(m);
        expected = n;
    }
};
struct rk_host_block {
    uint32_t threads = 1;
    rk_host_barrier all;      // every started thread of the block
    rk_host_barrier handler;  // the threads running a wide handler
    std::vector<std::thread> others;
    bool started = false;
    // The block's rk_block_shared (rk_device.cuh defines it).
    void* shared = nullptr;
    // Set by rk_actor_host.cuh: runs rk_follow on thread t; tells the
    // started threads to leave (through the barrier).
    void (*follow)(rk_host_block* block, uint32_t t) = nullptr;
    void (*stop)(rk_host_block* block) = nullptr;
};
static thread_local rk_host_block* rk_tls_block = nullptr;
static thread_local uint32_t rk_tls_thread = 0;
RK_DEVICE uint32_t rk_arch_thread(void) { return rk_tls_thread; }
RK_DEVICE uint32_t rk_arch_block_threads(void) { return rk_tls_block ? rk_tls_block->threads : 1u; }
RK_DEVICE void rk_arch_sync_all(void) {
    if (rk_tls_block && rk_tls_block->started) rk_tls_block->all.wait_expected();
}
RK_DEVICE void rk_arch_sync(uint32_t n) {
    if (rk_tls_block && n > 1) rk_tls_block->handler.wait(n);
}
// Thread 0: starts the block's other threads if they are not yet; false
// if the system refuses one (those started are then stopped again).
RK_DEVICE bool rk_arch_start_threads(void) {
    rk_host_block* b = rk_tls_block;
    if (!b) return false;
    if (b->started || b->threads <= 1) return true;
    // Set before any starts (a thread's start orders them for it).
    b->all.expect(b->threads);
    b->started = true;
    try {
        for (uint32_t t = 1; t < b->threads; ++t) {
            b->others.emplace_back([b, t] { b->follow(b, t); });
        }
    } catch (...) {
        b->all.expect((uint32_t)b->others.size() + 1);
        b->stop(b);
        for (std::thread& t : b->others) t.join();
        b->others.clear();
        b->started = false;
        return false;
    }
    return true;
}
#define RK_WIDE_FN static
RK_DEVICE void rk_arch_converge(void) {}

// The hooks the host gives the loop (c-host only): wake the poller after a
// K2H publish or an acknowledgement, wake senders after H2K room is made,
// and sleep until woken (a parked thread, at most `ns`).
typedef struct rk_host_hooks {
    void* ctx;
    void (*wake_host)(void* ctx);
    void (*wake_senders)(void* ctx);
    void (*idle)(void* ctx, uint32_t ns);
    // K2K: rewrites the slot's link table if its links changed (on the
    // loop's thread, between messages); wakes the receiver of outbound
    // row `row` after a publish into its ring.
    void (*links)(void* ctx);
    void (*wake_link)(void* ctx, uint32_t row);
    // K2K: wakes the sender of inbound row `row` after its ring's head moved.
    void (*wake_link_sender)(void* ctx, uint32_t row);
} rk_host_hooks;

RK_DEVICE void rk_hook_wake_host(void* hooks) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->wake_host) h->wake_host(h->ctx);
}
RK_DEVICE void rk_hook_wake_senders(void* hooks) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->wake_senders) h->wake_senders(h->ctx);
}
RK_DEVICE void rk_hook_links(void* hooks) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->links) h->links(h->ctx);
}
RK_DEVICE void rk_hook_wake_link(void* hooks, uint32_t row) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->wake_link) h->wake_link(h->ctx, row);
}
RK_DEVICE void rk_hook_wake_link_sender(void* hooks, uint32_t row) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->wake_link_sender) h->wake_link_sender(h->ctx, row);
}
RK_DEVICE void rk_hook_idle(void* hooks, uint32_t ns) {
    rk_host_hooks* h = (rk_host_hooks*)hooks;
    if (h && h->idle) {
        h->idle(h->ctx, ns);
    } else {
        struct timespec ts = {0, (long)ns};
        nanosleep(&ts, nullptr);
    }
}
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer does not see an inlined (vectorised) copy: call memcpy
// through a pointer the compiler cannot see through, so the sanitizer's
// interceptor checks every byte range the loop reads or writes.
static void* (*volatile rk_memcpy)(void*, const void*, size_t) = memcpy;
RK_DEVICE void rk_copy(void* dst, const void* src, uint32_t n) { rk_memcpy(dst, src, n); }
#else
RK_DEVICE void rk_copy(void* dst, const void* src, uint32_t n) { memcpy(dst, src, n); }
#endif
