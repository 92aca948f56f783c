/* ringkernel protocol layouts — GENERATED from the Rust core (src/layout.rs).
 * Do not edit: regenerate with `RINGKERNEL_BLESS=1 cargo test --test c_header`.
 *
 * Little-endian. Every struct's size, alignment and field offsets are
 * asserted below from Rust's offset_of!, so a disagreement fails the build.
 * Fields named in comments as atomics are accessed only with acquire/release
 * operations (ld.acquire.sys / st.release.sys on CUDA); see docs/protocol.md.
 */
#ifndef RINGKERNEL_PROTOCOL_H
#define RINGKERNEL_PROTOCOL_H

#if defined(__CUDACC_RTC__)
/* NVRTC: no standard headers at run time. */
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef long long int64_t;
#define RK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
/* NVRTC has no constant offsetof: offsets are asserted by every other compiler. */
#define RK_ASSERT_OFFSET(t, f, n)
#define RK_ALIGNAS(n) alignas(n)
#define RK_ALIGNOF(t) alignof(t)
#elif defined(__cplusplus)
#include <cstddef>
#include <cstdint>
#define RK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#define RK_ALIGNAS(n) alignas(n)
#define RK_ALIGNOF(t) alignof(t)
#else
#include <stddef.h>
#include <stdint.h>
#define RK_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#define RK_ALIGNAS(n) _Alignas(n)
#define RK_ALIGNOF(t) _Alignof(t)
#endif
#ifndef RK_ASSERT_OFFSET
#define RK_ASSERT_OFFSET(t, f, n) RK_STATIC_ASSERT(offsetof(t, f) == (n), "offsetof " #t "." #f)
#endif

#define RK_ENVELOPE_MAGIC                0x4b52ull /* "RK" as a little-endian u16 */
#define RK_PROTOCOL_VERSION              0x1ull /* envelope version */
#define RK_HEADER_SIZE                   0x40ull /* envelope header bytes */
#define RK_SYSTEM_TYPE_BASE              0xffff0000ull /* type ids from here on are the runtime's */
#define RK_MAX_INLINE                    0x40ull /* largest inline payload of a message or reply */
#define RK_SYS_NO_REPLY                  0xffff0001ull /* type id of the reply to an ask its handler neither answered nor deferred */
#define RK_FLAG_ASK                      0x1ull /* a reply is expected */
#define RK_FLAG_REPLY                    0x2ull /* a reply to `correlation` */
#define RK_FLAG_ERROR                    0x4ull /* a reply carrying an error */
#define RK_FLAG_ARCHIVED                 0x8ull /* payload is an rkyv archive */
#define RK_FLAG_FAULT                    0x10ull /* a fault report */
#define RK_FLAG_UNDELIVERED              0x20ull /* K2H: a send its K2K link could not take (a dead letter) */
#define RK_FLAGS_ALL                     0x3full /* every defined flag bit */
#define RK_RING_MAGIC                    0x474e4952ull /* "RING" as a little-endian u32 */
#define RK_RING_VERSION                  0x1ull /* ring layout version */
#define RK_RING_HEADER_SIZE              0x180ull /* ring header bytes */
#define RK_RING_MIN_CAPACITY             0x2ull /* smallest ring capacity */
#define RK_RING_MAX_CAPACITY             0x1000000ull /* largest ring capacity */
#define RK_MIN_SLOT_SIZE                 0x40ull /* smallest slot */
#define RK_MAX_SLOT_SIZE                 0x10000ull /* largest slot */
#define RK_DEFAULT_SLOT_SIZE             0x80ull /* default slot: header + 64 payload bytes */
#define RK_REGION_ALIGN                  0x80ull /* alignment of rings and control blocks */
#define RK_CONTROL_MAGIC                 0x42434b52ull /* "RKCB" as a little-endian u32 */
#define RK_CONTROL_VERSION               0x2ull /* control block version */
#define RK_CONTROL_BLOCK_SIZE            0x180ull /* control block bytes */
#define RK_COMMIT_FENCED                 0x1ull /* commit word: the host fenced this incarnation (seq is the word >> 1) */
#define RK_LINK_MAGIC                    0x4b4c4b52ull /* "RKLK" as a little-endian u32 */
#define RK_LINK_VERSION                  0x2ull /* link control layout version */
#define RK_LINK_CONTROL_SIZE             0x100ull /* size of rk_link_control */
#define RK_LINK_FENCED                   0x1ull /* fence bit of a link's commit word (epoch << 48 | consumed << 1 | fenced) */
#define RK_LINK_CONSUMED_BITS            0x2full /* bits of the consumed count in a link's commit word */
#define RK_LINK_RECEIVER_GONE            0x1ull /* closed bit: the receiver is gone for good */
#define RK_LINK_SENDER_GONE              0x2ull /* closed bit: the sender is gone for good */
#define RK_MAX_SLOT_LINKS                0x10ull /* rows of a link table each way (inbound, outbound) */
#define RK_LINK_TABLE_ROWS_AT            0x80ull /* offset of a link table's first (inbound) row */
#define RK_LINK_ROW_REPORTS_FAILURES     0x1ull /* link row flag: a send the link has no room for is a dead letter */
#define RK_ORIGIN_LINK                   0x8000000000000000ull /* seq of a routed send made while serving a link message: this bit | link id << 40 | position */
#define RK_DOORBELL_AWAKE                0x0ull /* doorbell: the loop is running */
#define RK_DOORBELL_PARKED               0x1ull /* doorbell: the loop is going to sleep */
#define RK_DOORBELL_NAPPING              0x2ull /* doorbell: the cpu loop naps (only RK_DOORBELL_PARKED wakes on a tell) */
#define RK_HLC_LOGICAL_BITS              0x4ull /* low bits of the HLC word that count */
#define RK_HLC_LOGICAL_MASK              0xfull /* mask of the logical counter */
#define RK_STATE_CREATED                 0x0ull /* lifecycle state */
#define RK_STATE_LAUNCHED                0x1ull /* lifecycle state */
#define RK_STATE_ACTIVE                  0x2ull /* lifecycle state */
#define RK_STATE_DEACTIVATED             0x3ull /* lifecycle state */
#define RK_STATE_TERMINATED              0x4ull /* lifecycle state */
#define RK_STATE_FAULTED                 0x5ull /* lifecycle state */
#define RK_FAULT_NONE                    0x0ull /* fault code */
#define RK_FAULT_HANDLER_PANIC           0x1ull /* fault code */
#define RK_FAULT_HANDLER_FAULT           0x2ull /* fault code */
#define RK_FAULT_BAD_ENVELOPE            0x3ull /* fault code */
#define RK_FAULT_UNKNOWN_MESSAGE_TYPE    0x4ull /* fault code */
#define RK_FAULT_WATCHDOG                0x5ull /* fault code */
#define RK_FAULT_DEVICE_ERROR            0x6ull /* fault code */
#define RK_FAULT_UNEXPECTED_EXIT         0x7ull /* fault code */

/* The 64-byte envelope header at the start of every slot. */
typedef struct rk_envelope_header {
    uint16_t magic; /* offset 0 */
    uint8_t version; /* offset 2 */
    uint8_t flags; /* offset 3 */
    uint32_t type_id; /* offset 4 */
    uint32_t payload_len; /* offset 8 */
    uint32_t clock_domain; /* offset 12 */
    uint64_t correlation; /* offset 16 */
    uint64_t src; /* offset 24 */
    uint64_t dst; /* offset 32 */
    uint64_t hlc; /* offset 40 */
    uint64_t seq; /* offset 48 */
    uint64_t trace_id; /* offset 56 */
} rk_envelope_header;
RK_STATIC_ASSERT(sizeof(rk_envelope_header) == 64, "sizeof rk_envelope_header");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_envelope_header) == 8, "alignof rk_envelope_header");
RK_ASSERT_OFFSET(rk_envelope_header, magic, 0);
RK_ASSERT_OFFSET(rk_envelope_header, version, 2);
RK_ASSERT_OFFSET(rk_envelope_header, flags, 3);
RK_ASSERT_OFFSET(rk_envelope_header, type_id, 4);
RK_ASSERT_OFFSET(rk_envelope_header, payload_len, 8);
RK_ASSERT_OFFSET(rk_envelope_header, clock_domain, 12);
RK_ASSERT_OFFSET(rk_envelope_header, correlation, 16);
RK_ASSERT_OFFSET(rk_envelope_header, src, 24);
RK_ASSERT_OFFSET(rk_envelope_header, dst, 32);
RK_ASSERT_OFFSET(rk_envelope_header, hlc, 40);
RK_ASSERT_OFFSET(rk_envelope_header, seq, 48);
RK_ASSERT_OFFSET(rk_envelope_header, trace_id, 56);

/* A ring's header; `capacity * slot_size` bytes of slots follow it. */
typedef struct rk_ring_header {
    RK_ALIGNAS(128) uint64_t tail; /* offset 0 */
    uint8_t _pad0[120];
    uint64_t head; /* offset 128 */
    uint8_t _pad1[120];
    uint32_t magic; /* offset 256 */
    uint32_t version; /* offset 260 */
    uint32_t capacity; /* offset 264 */
    uint32_t slot_size; /* offset 268 */
    uint8_t _pad2[112];
} rk_ring_header;
RK_STATIC_ASSERT(sizeof(rk_ring_header) == 384, "sizeof rk_ring_header");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_ring_header) == 128, "alignof rk_ring_header");
RK_ASSERT_OFFSET(rk_ring_header, tail, 0);
RK_ASSERT_OFFSET(rk_ring_header, head, 128);
RK_ASSERT_OFFSET(rk_ring_header, magic, 256);
RK_ASSERT_OFFSET(rk_ring_header, version, 260);
RK_ASSERT_OFFSET(rk_ring_header, capacity, 264);
RK_ASSERT_OFFSET(rk_ring_header, slot_size, 268);

/* One actor slot's control block: host line, device line, doorbell line. */
typedef struct rk_control_block {
    RK_ALIGNAS(128) uint32_t magic; /* offset 0 */
    uint32_t version; /* offset 4 */
    uint32_t requested_state; /* offset 8 */
    uint32_t incarnation; /* offset 12 */
    uint8_t _pad0[112];
    uint32_t acked_state; /* offset 128 */
    uint32_t acked_incarnation; /* offset 132 */
    uint32_t fault_code; /* offset 136 */
    uint8_t _pad1[4];
    uint64_t heartbeat; /* offset 144 */
    uint64_t processed; /* offset 152 */
    uint64_t fault_detail; /* offset 160 */
    uint64_t commit; /* offset 168 */
    uint64_t serving; /* offset 176 */
    uint64_t serving_correlation; /* offset 184 */
    uint8_t _pad2[64];
    uint32_t doorbell; /* offset 256 */
    uint8_t _pad3[124];
} rk_control_block;
RK_STATIC_ASSERT(sizeof(rk_control_block) == 384, "sizeof rk_control_block");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_control_block) == 128, "alignof rk_control_block");
RK_ASSERT_OFFSET(rk_control_block, magic, 0);
RK_ASSERT_OFFSET(rk_control_block, version, 4);
RK_ASSERT_OFFSET(rk_control_block, requested_state, 8);
RK_ASSERT_OFFSET(rk_control_block, incarnation, 12);
RK_ASSERT_OFFSET(rk_control_block, acked_state, 128);
RK_ASSERT_OFFSET(rk_control_block, acked_incarnation, 132);
RK_ASSERT_OFFSET(rk_control_block, fault_code, 136);
RK_ASSERT_OFFSET(rk_control_block, heartbeat, 144);
RK_ASSERT_OFFSET(rk_control_block, processed, 152);
RK_ASSERT_OFFSET(rk_control_block, fault_detail, 160);
RK_ASSERT_OFFSET(rk_control_block, commit, 168);
RK_ASSERT_OFFSET(rk_control_block, serving, 176);
RK_ASSERT_OFFSET(rk_control_block, serving_correlation, 184);
RK_ASSERT_OFFSET(rk_control_block, doorbell, 256);

/* A K2K link's control words (receiver line, host line); its ring is an rk_ring_header with slots. */
typedef struct rk_link_control {
    RK_ALIGNAS(128) uint64_t commit; /* offset 0 */
    uint8_t _pad0[120];
    uint64_t closed; /* offset 128 */
    uint32_t magic; /* offset 136 */
    uint32_t version; /* offset 140 */
    uint32_t capacity; /* offset 144 */
    uint32_t publishing; /* offset 148 */
    uint8_t _pad1[104];
} rk_link_control;
RK_STATIC_ASSERT(sizeof(rk_link_control) == 256, "sizeof rk_link_control");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_link_control) == 128, "alignof rk_link_control");
RK_ASSERT_OFFSET(rk_link_control, commit, 0);
RK_ASSERT_OFFSET(rk_link_control, closed, 128);
RK_ASSERT_OFFSET(rk_link_control, magic, 136);
RK_ASSERT_OFFSET(rk_link_control, version, 140);
RK_ASSERT_OFFSET(rk_link_control, capacity, 144);
RK_ASSERT_OFFSET(rk_link_control, publishing, 148);

/* One K2K link of a slot's link table, as its device loop serves it in place. */
typedef struct rk_link_row {
    RK_ALIGNAS(64) uint64_t control; /* offset 0 */
    uint64_t ring; /* offset 8 */
    uint64_t peer; /* offset 16 */
    uint64_t served; /* offset 24 */
    uint32_t n_served; /* offset 32 */
    uint32_t id; /* offset 36 */
    uint32_t flags; /* offset 40 */
    uint32_t capacity; /* offset 44 */
    uint8_t _pad0[16];
} rk_link_row;
RK_STATIC_ASSERT(sizeof(rk_link_row) == 64, "sizeof rk_link_row");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_link_row) == 64, "alignof rk_link_row");
RK_ASSERT_OFFSET(rk_link_row, control, 0);
RK_ASSERT_OFFSET(rk_link_row, ring, 8);
RK_ASSERT_OFFSET(rk_link_row, peer, 16);
RK_ASSERT_OFFSET(rk_link_row, served, 24);
RK_ASSERT_OFFSET(rk_link_row, n_served, 32);
RK_ASSERT_OFFSET(rk_link_row, id, 36);
RK_ASSERT_OFFSET(rk_link_row, flags, 40);
RK_ASSERT_OFFSET(rk_link_row, capacity, 44);

/* A slot's K2K links (seqlock: generation odd while the host writes); RK_MAX_SLOT_LINKS inbound rk_link_row at RK_LINK_TABLE_ROWS_AT, then as many outbound. */
typedef struct rk_link_table {
    RK_ALIGNAS(128) uint64_t generation; /* offset 0 */
    uint32_t n_in; /* offset 8 */
    uint32_t n_out; /* offset 12 */
    uint64_t seen; /* offset 16 */
    uint8_t _pad0[2152];
} rk_link_table;
RK_STATIC_ASSERT(sizeof(rk_link_table) == 2176, "sizeof rk_link_table");
RK_STATIC_ASSERT(RK_ALIGNOF(rk_link_table) == 128, "alignof rk_link_table");
RK_ASSERT_OFFSET(rk_link_table, generation, 0);
RK_ASSERT_OFFSET(rk_link_table, n_in, 8);
RK_ASSERT_OFFSET(rk_link_table, n_out, 12);
RK_ASSERT_OFFSET(rk_link_table, seen, 16);

#endif /* RINGKERNEL_PROTOCOL_H */
