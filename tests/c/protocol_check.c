/* Compiled as C11 and as C++17 by tests/c_header.rs. It fills protocol
 * structs through the generated header and prints their bytes as hex, one
 * record per line, for the Rust side to decode and validate. */
#include "ringkernel_protocol.h"

#include <stdio.h>
#include <string.h>

static void hex(const char *name, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    printf("%s ", name);
    for (i = 0; i < n; i++) {
        printf("%02x", b[i]);
    }
    printf("\n");
}

int main(void) {
    unsigned char slot[RK_DEFAULT_SLOT_SIZE];
    rk_envelope_header h;
    uint64_t payload = 0xCAFEF00DDEADBEEFull;
    RK_ALIGNAS(128) static unsigned char ring[RK_RING_HEADER_SIZE + 4 * RK_DEFAULT_SLOT_SIZE];
    rk_ring_header *rh = (rk_ring_header *)(void *)ring;
    rk_control_block cb;
    rk_link_control lc;

    memset(&h, 0, sizeof h);
    h.magic = (uint16_t)RK_ENVELOPE_MAGIC;
    h.version = (uint8_t)RK_PROTOCOL_VERSION;
    h.flags = (uint8_t)(RK_FLAG_ASK | RK_FLAG_FAULT);
    h.type_id = 0x01020304u;
    h.payload_len = (uint32_t)sizeof payload;
    h.clock_domain = 0x00070003u;
    h.correlation = 0x0001000000050009ull;
    h.src = 0x0001010000020000ull;
    h.dst = 0x0001020000030004ull;
    h.hlc = 0x17A0B0C0D0E0F001ull;
    h.seq = 42;
    h.trace_id = 0x0123456789ABCDEFull;
    memset(slot, 0, sizeof slot);
    memcpy(slot, &h, sizeof h);
    memcpy(slot + RK_HEADER_SIZE, &payload, sizeof payload);
    hex("envelope", slot, sizeof slot);

    /* A ring initialised by the C side: Rust must attach to it. */
    memset(ring, 0, sizeof ring);
    rh->magic = (uint32_t)RK_RING_MAGIC;
    rh->version = (uint32_t)RK_RING_VERSION;
    rh->capacity = 4;
    rh->slot_size = (uint32_t)RK_DEFAULT_SLOT_SIZE;
    memcpy(ring + RK_RING_HEADER_SIZE, slot, sizeof slot); /* slot 0 */
    rh->tail = 1;
    hex("ring", ring, sizeof ring);

    memset(&cb, 0, sizeof cb);
    cb.magic = (uint32_t)RK_CONTROL_MAGIC;
    cb.version = (uint32_t)RK_CONTROL_VERSION;
    cb.requested_state = (uint32_t)RK_STATE_ACTIVE;
    cb.acked_state = (uint32_t)RK_STATE_FAULTED;
    cb.fault_code = (uint32_t)RK_FAULT_HANDLER_FAULT;
    cb.fault_detail = 77;
    cb.heartbeat = 5;
    cb.processed = 4;
    cb.doorbell = (uint32_t)RK_DOORBELL_PARKED;
    hex("control", &cb, sizeof cb);

    /* A link's control words: epoch 3, 9 consumed, fenced; sender gone. */
    memset(&lc, 0, sizeof lc);
    lc.commit = (3ull << 48) | (9ull << 1) | RK_LINK_FENCED;
    lc.closed = RK_LINK_SENDER_GONE;
    lc.magic = (uint32_t)RK_LINK_MAGIC;
    lc.version = (uint32_t)RK_LINK_VERSION;
    lc.capacity = 64;
    hex("link", &lc, sizeof lc);
    return 0;
}
