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
#else
extern "C" void rk_host_block_run(rk_slot_desc* slot) { rk_block_run(slot); }
#endif
