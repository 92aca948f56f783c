// ringkernel — the entry points of the actor-host loop. CUDA: one
// cooperative launch of `rk_actor_host`, one block per actor slot: thread
// 0 runs the slot's loop, the others follow it into wide handlers. c-host:
// `rk_host_block_run`, one OS thread per device thread of a block.
#pragma once

#ifdef RK_ARCH_CUDA
extern "C" __global__ void rk_actor_host(rk_slot_desc* slots, uint32_t n) {
    uint32_t b = blockIdx.x;
    if (b >= n) return;  // the whole block
    if (threadIdx.x == 0) {
        rk_block_run(&slots[b]);
        rk_block_exit();
    } else {
        rk_follow();
    }
}

// Calibration: the device's clock, for the host to compare with its own
// (launched before the actor-host kernel, which then owns the device).
extern "C" __global__ void rk_clock_probe(uint64_t* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) rk_st_release_u64(out, rk_device_time_ns());
}
#else
// Runs one block of `threads` threads: the calling thread is thread 0 (it
// runs the loop; the host hooks park and wake it); the others start when a
// wide kernel is first assigned (rk_arch_start_threads) and join when
// thread 0 leaves.
extern "C" void rk_host_block_run(rk_slot_desc* slot, uint32_t threads) {
    rk_host_block* block = new (std::nothrow) rk_host_block();
    rk_block_shared* shared = new (std::nothrow) rk_block_shared();
    if (!block || !shared) {
        delete block;
        delete shared;
        return;
    }
    block->threads = threads ? threads : 1u;
    block->shared = shared;
    shared->width = 1;
    block->follow = [](rk_host_block* b, uint32_t t) {
        rk_tls_block = b;
        rk_tls_shared = (rk_block_shared*)b->shared;
        rk_tls_thread = t;
        rk_follow();
    };
    block->stop = [](rk_host_block* b) {
        ((rk_block_shared*)b->shared)->cmd = RK_CMD_EXIT;
        b->all.wait_expected();
    };
    rk_tls_block = block;
    rk_tls_shared = shared;
    rk_tls_thread = 0;
    rk_block_run(slot);
    rk_block_exit();
    for (std::thread& t : block->others) t.join();
    rk_tls_block = nullptr;
    rk_tls_shared = nullptr;
    delete block;
    delete shared;
}
#endif
