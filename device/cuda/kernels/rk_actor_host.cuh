// ringkernel — the entry points of the actor-host loop. CUDA: one
// cooperative launch of `rk_actor_host`, one block per actor slot, thread
// 0 running the slot (handlers declare width Thread; wider widths are
// refused at launch). c-host: `rk_host_block_run`, one OS thread per block.
#pragma once

#ifdef RK_ARCH_CUDA
extern "C" __global__ void rk_actor_host(rk_slot_desc* slots, uint32_t n) {
    uint32_t b = blockIdx.x;
    if (b < n && threadIdx.x == 0) rk_block_run(&slots[b]);
}

// Calibration: the device's clock, for the host to compare with its own
// (launched before the actor-host kernel, which then owns the device).
extern "C" __global__ void rk_clock_probe(uint64_t* out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) rk_st_release_u64(out, rk_device_time_ns());
}
#else
extern "C" void rk_host_block_run(rk_slot_desc* slot) { rk_block_run(slot); }
#endif
