// ringkernel — the device intrinsics of the actor-host loop, for CUDA
// (nvcc and NVRTC). Everything the loop needs from the machine goes through
// these few functions; rk_arch_host.h gives the same names for host C++
// (the c-host backend), so the loop itself is one text for both.
//
// Memory model: the shared region is pinned host memory mapped into the
// device, so every protocol word is accessed at *system* scope with inline
// PTX (`ld.acquire.sys`, `st.release.sys`, `atom.release.sys.cas`,
// `fence.sc.sys`) — NVRTC needs no CCCL headers for it. Slot bytes are
// plain loads and stores ordered by those.
#pragma once

#define RK_ARCH_CUDA 1
#define RK_DEVICE __device__ __forceinline__
#define RK_LOOP_NAME "ringkernel-cuda"

// Acquire loads: pair with the host's store-release of the same word
// (a ring's tail, the requested state, the commit word's fence).
RK_DEVICE uint64_t rk_ld_acquire_u64(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
RK_DEVICE uint32_t rk_ld_acquire_u32(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Release stores: pair with the host's load-acquire of the same word.
RK_DEVICE void rk_st_release_u64(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}
RK_DEVICE void rk_st_release_u32(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.u32 [%0], %1;" : : "l"(p), "r"(v) : "memory");
}
// Relaxed: words whose ordering a later release (or earlier acquire) gives.
RK_DEVICE uint64_t rk_ld_relaxed_u64(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.relaxed.sys.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
RK_DEVICE uint32_t rk_ld_relaxed_u32(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.relaxed.sys.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
RK_DEVICE void rk_st_relaxed_u64(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.sys.u64 [%0], %1;" : : "l"(p), "l"(v) : "memory");
}
RK_DEVICE void rk_st_relaxed_u32(uint32_t* p, uint32_t v) {
    asm volatile("st.relaxed.sys.u32 [%0], %1;" : : "l"(p), "r"(v) : "memory");
}
// The commit CAS: release on success (publishes the K2H tail stored before
// it to the host's acq-rel fence), relaxed on failure. Returns whether it
// took.
RK_DEVICE bool rk_cas_release_u64(uint64_t* p, uint64_t expected, uint64_t desired) {
    uint64_t old;
    asm volatile("atom.release.sys.cas.b64 %0, [%1], %2, %3;"
                 : "=l"(old)
                 : "l"(p), "l"(expected), "l"(desired)
                 : "memory");
    return old == expected;
}
// The doorbell's fence: pairs with the host waker's SeqCst fence.
RK_DEVICE void rk_fence_sc(void) { asm volatile("fence.sc.sys;" : : : "memory"); }

// Device time (ns, %globaltimer); the host's calibration offset is added
// by the loop.
RK_DEVICE uint64_t rk_device_time_ns(void) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The block's threads. Thread 0 runs the slot's loop; with a wide kernel
// every thread of the run also runs its handler. The barriers are
// `barrier.sync`, not __syncthreads() (which is `.aligned`: every thread of
// a warp at the same instruction): thread 0 and the others wait for each
// other at different places in the code. A barrier orders the shared and
// global memory accesses of the threads taking part.
RK_DEVICE uint32_t rk_arch_thread(void) { return threadIdx.x; }
RK_DEVICE uint32_t rk_arch_block_threads(void) { return blockDim.x; }
// Every thread of the block (barrier 0).
RK_DEVICE void rk_arch_sync_all(void) { asm volatile("barrier.sync 0;" : : : "memory"); }
// The first `n` threads (barrier 1; `n` a multiple of the warp size).
RK_DEVICE void rk_arch_sync(uint32_t n) {
    asm volatile("barrier.sync 1, %0;" : : "r"(n) : "memory");
}
// A wide handler's threads enter it from two call sites (thread 0 from the
// loop, the others from rk_follow): one out-of-line function, whose first
// step reconverges each warp, so a warp runs the handler once, not lane 0
// and lanes 1-31 one after the other.
#define RK_WIDE_FN __device__ __noinline__
RK_DEVICE void rk_arch_converge(void) { __syncwarp(); }
// Blocks start all their threads at launch.
RK_DEVICE bool rk_arch_start_threads(void) { return true; }

// Host hooks do not exist on a GPU: the poller polls K2H, senders poll H2K
// room, and idling is a back-off sleep.
RK_DEVICE void rk_hook_wake_host(void* hooks) { (void)hooks; }
RK_DEVICE void rk_hook_wake_senders(void* hooks) { (void)hooks; }
// K2K: the host's monitor rewrites the link tables; a receiver polls its
// links (its idle back-off bounds the latency), so a send wakes no one.
RK_DEVICE void rk_hook_links(void* hooks) { (void)hooks; }
RK_DEVICE void rk_hook_wake_link(void* hooks, uint32_t row) { (void)hooks; (void)row; }
RK_DEVICE void rk_hook_wake_link_sender(void* hooks, uint32_t row) { (void)hooks; (void)row; }
RK_DEVICE void rk_hook_idle(void* hooks, uint32_t ns) {
    (void)hooks;
    __nanosleep(ns);
}
// Copies in 8-byte words when both ends and the length allow (slots are
// 64-byte aligned: a header is 8 loads over the bus, not 64).
RK_DEVICE void rk_copy(void* dst, const void* src, uint32_t n) {
    if ((((uint64_t)dst | (uint64_t)src | n) & 7) == 0) {
        uint64_t* d = (uint64_t*)dst;
        const uint64_t* s = (const uint64_t*)src;
        for (uint32_t i = 0; i < n / 8; ++i) d[i] = s[i];
        return;
    }
    uint8_t* d = (uint8_t*)dst;
    const uint8_t* s = (const uint8_t*)src;
    for (uint32_t i = 0; i < n; ++i) d[i] = s[i];
}
