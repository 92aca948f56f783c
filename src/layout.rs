//! The C mirror of every shared struct.
//!
//! `device/include/ringkernel_protocol.h` is *generated* from this module:
//! each struct's size, alignment and field offsets come from Rust's
//! `size_of`/`align_of`/`offset_of!`, and the header repeats them as
//! `static_assert`s, so the C (and CUDA) side fails to compile if the two
//! ever disagree. A test regenerates the header and fails if the committed
//! file is stale (`RINGKERNEL_BLESS=1` rewrites it), then compiles it as C11
//! and C++17 and exchanges bytes with Rust.
//!
//! No layout is copied by hand: the WGSL mirror will be checked against
//! [`structs`] the same way.

use crate::control::{
    COMMIT_FENCED, CONTROL_BLOCK_SIZE, CONTROL_MAGIC, CONTROL_VERSION, ControlBlock, FaultCode,
    LifecycleState,
};
use crate::doorbell::{AWAKE, NAPPING, PARKED};
use crate::envelope::{
    ENVELOPE_MAGIC, EnvelopeHeader, Flags, HEADER_SIZE, PROTOCOL_VERSION, SYSTEM_TYPE_BASE,
};
use crate::hlc::{LOGICAL_BITS, LOGICAL_MASK};
use crate::link::{
    LINK_CONSUMED_BITS, LINK_CONTROL_SIZE, LINK_FENCED, LINK_MAGIC, LINK_RECEIVER_GONE,
    LINK_ROW_REPORTS_FAILURES, LINK_SENDER_GONE, LINK_TABLE_ROWS_AT, LINK_VERSION, LinkControl,
    LinkRow, LinkTable, MAX_SLOT_LINKS, ORIGIN_LINK,
};
use crate::region::REGION_ALIGN;
use crate::ring::{
    DEFAULT_SLOT_SIZE, RING_HEADER_SIZE, RING_MAGIC, RING_VERSION, RingHeader, RingLayout,
};
use std::fmt::Write;
use std::mem::{align_of, offset_of, size_of};

/// Where the generated header lives, relative to the workspace root.
pub const C_HEADER_PATH: &str = "device/include/ringkernel_protocol.h";

/// One field of a shared struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Field name (the same in Rust and C).
    pub name: &'static str,
    /// C type.
    pub c_type: &'static str,
    /// Byte offset (from `offset_of!`).
    pub offset: usize,
    /// Byte size (from `size_of` of the Rust field's type).
    pub size: usize,
}

/// A shared struct, as Rust lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Struct {
    /// C type name.
    pub c_name: &'static str,
    /// One-line description.
    pub doc: &'static str,
    /// `size_of`.
    pub size: usize,
    /// `align_of`.
    pub align: usize,
    /// The fields the other side reads or writes (padding is implicit).
    pub fields: Vec<Field>,
}

/// A protocol constant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constant {
    /// C macro name.
    pub name: &'static str,
    /// Value.
    pub value: u64,
    /// One-line description.
    pub doc: &'static str,
}

fn size_of_field<S, T>(_: fn(&S) -> &T) -> usize {
    size_of::<T>()
}

macro_rules! shared_struct {
    ($ty:ty, $c_name:literal, $doc:literal, { $($field:ident : $c_type:literal),* $(,)? }) => {
        Struct {
            c_name: $c_name,
            doc: $doc,
            size: size_of::<$ty>(),
            align: align_of::<$ty>(),
            fields: vec![$(Field {
                name: stringify!($field),
                c_type: $c_type,
                offset: offset_of!($ty, $field),
                size: size_of_field(|s: &$ty| &s.$field),
            }),*],
        }
    };
}

/// Every struct host and device share, with Rust's layout.
pub fn structs() -> Vec<Struct> {
    vec![
        shared_struct!(EnvelopeHeader, "rk_envelope_header", "The 64-byte envelope header at the start of every slot.", {
            magic: "uint16_t",
            version: "uint8_t",
            flags: "uint8_t",
            type_id: "uint32_t",
            payload_len: "uint32_t",
            clock_domain: "uint32_t",
            correlation: "uint64_t",
            src: "uint64_t",
            dst: "uint64_t",
            hlc: "uint64_t",
            seq: "uint64_t",
            trace_id: "uint64_t",
        }),
        shared_struct!(RingHeader, "rk_ring_header", "A ring's header; `capacity * slot_size` bytes of slots follow it.", {
            tail: "uint64_t",
            head: "uint64_t",
            magic: "uint32_t",
            version: "uint32_t",
            capacity: "uint32_t",
            slot_size: "uint32_t",
        }),
        shared_struct!(ControlBlock, "rk_control_block", "One actor slot's control block: host line, device line, doorbell line.", {
            magic: "uint32_t",
            version: "uint32_t",
            requested_state: "uint32_t",
            incarnation: "uint32_t",
            acked_state: "uint32_t",
            acked_incarnation: "uint32_t",
            fault_code: "uint32_t",
            heartbeat: "uint64_t",
            processed: "uint64_t",
            fault_detail: "uint64_t",
            commit: "uint64_t",
            serving: "uint64_t",
            serving_correlation: "uint64_t",
            doorbell: "uint32_t",
        }),
        shared_struct!(LinkControl, "rk_link_control", "A K2K link's control words (receiver line, host line); its ring is an rk_ring_header with slots.", {
            commit: "uint64_t",
            closed: "uint64_t",
            magic: "uint32_t",
            version: "uint32_t",
            capacity: "uint32_t",
            publishing: "uint32_t",
        }),
        shared_struct!(LinkRow, "rk_link_row", "One K2K link of a slot's link table, as its device loop serves it in place.", {
            control: "uint64_t",
            ring: "uint64_t",
            peer: "uint64_t",
            served: "uint64_t",
            n_served: "uint32_t",
            id: "uint32_t",
            flags: "uint32_t",
            capacity: "uint32_t",
        }),
        shared_struct!(LinkTable, "rk_link_table", "A slot's K2K links (seqlock: generation odd while the host writes); RK_MAX_SLOT_LINKS inbound rk_link_row at RK_LINK_TABLE_ROWS_AT, then as many outbound.", {
            generation: "uint64_t",
            n_in: "uint32_t",
            n_out: "uint32_t",
            seen: "uint64_t",
        }),
    ]
}

/// Every protocol constant the device side needs.
pub fn constants() -> Vec<Constant> {
    let mut c = vec![
        Constant {
            name: "RK_ENVELOPE_MAGIC",
            value: ENVELOPE_MAGIC.into(),
            doc: "\"RK\" as a little-endian u16",
        },
        Constant {
            name: "RK_PROTOCOL_VERSION",
            value: PROTOCOL_VERSION.into(),
            doc: "envelope version",
        },
        Constant {
            name: "RK_HEADER_SIZE",
            value: HEADER_SIZE as u64,
            doc: "envelope header bytes",
        },
        Constant {
            name: "RK_SYSTEM_TYPE_BASE",
            value: SYSTEM_TYPE_BASE.into(),
            doc: "type ids from here on are the runtime's",
        },
        Constant {
            name: "RK_MAX_INLINE",
            value: crate::kernel::MAX_INLINE as u64,
            doc: "largest inline payload of a message or reply",
        },
        Constant {
            name: "RK_SYS_NO_REPLY",
            value: crate::kernel::SYS_NO_REPLY.into(),
            doc: "type id of the reply to an ask its handler neither answered nor deferred",
        },
        Constant {
            name: "RK_FLAG_ASK",
            value: Flags::ASK.bits().into(),
            doc: "a reply is expected",
        },
        Constant {
            name: "RK_FLAG_REPLY",
            value: Flags::REPLY.bits().into(),
            doc: "a reply to `correlation`",
        },
        Constant {
            name: "RK_FLAG_ERROR",
            value: Flags::ERROR.bits().into(),
            doc: "a reply carrying an error",
        },
        Constant {
            name: "RK_FLAG_ARCHIVED",
            value: Flags::ARCHIVED.bits().into(),
            doc: "payload is an rkyv archive",
        },
        Constant {
            name: "RK_FLAG_FAULT",
            value: Flags::FAULT.bits().into(),
            doc: "a fault report",
        },
        Constant {
            name: "RK_FLAG_UNDELIVERED",
            value: Flags::UNDELIVERED.bits().into(),
            doc: "K2H: a send its K2K link could not take (a dead letter)",
        },
        Constant {
            name: "RK_FLAGS_ALL",
            value: Flags::ALL.bits().into(),
            doc: "every defined flag bit",
        },
        Constant {
            name: "RK_RING_MAGIC",
            value: RING_MAGIC.into(),
            doc: "\"RING\" as a little-endian u32",
        },
        Constant {
            name: "RK_RING_VERSION",
            value: RING_VERSION.into(),
            doc: "ring layout version",
        },
        Constant {
            name: "RK_RING_HEADER_SIZE",
            value: RING_HEADER_SIZE as u64,
            doc: "ring header bytes",
        },
        Constant {
            name: "RK_RING_MIN_CAPACITY",
            value: RingLayout::MIN_CAPACITY.into(),
            doc: "smallest ring capacity",
        },
        Constant {
            name: "RK_RING_MAX_CAPACITY",
            value: RingLayout::MAX_CAPACITY.into(),
            doc: "largest ring capacity",
        },
        Constant {
            name: "RK_MIN_SLOT_SIZE",
            value: RingLayout::MIN_SLOT_SIZE.into(),
            doc: "smallest slot",
        },
        Constant {
            name: "RK_MAX_SLOT_SIZE",
            value: RingLayout::MAX_SLOT_SIZE.into(),
            doc: "largest slot",
        },
        Constant {
            name: "RK_DEFAULT_SLOT_SIZE",
            value: DEFAULT_SLOT_SIZE.into(),
            doc: "default slot: header + 64 payload bytes",
        },
        Constant {
            name: "RK_REGION_ALIGN",
            value: REGION_ALIGN as u64,
            doc: "alignment of rings and control blocks",
        },
        Constant {
            name: "RK_CONTROL_MAGIC",
            value: CONTROL_MAGIC.into(),
            doc: "\"RKCB\" as a little-endian u32",
        },
        Constant {
            name: "RK_CONTROL_VERSION",
            value: CONTROL_VERSION.into(),
            doc: "control block version",
        },
        Constant {
            name: "RK_CONTROL_BLOCK_SIZE",
            value: CONTROL_BLOCK_SIZE as u64,
            doc: "control block bytes",
        },
        Constant {
            name: "RK_COMMIT_FENCED",
            value: COMMIT_FENCED,
            doc: "commit word: the host fenced this incarnation (seq is the word >> 1)",
        },
        Constant {
            name: "RK_LINK_MAGIC",
            value: LINK_MAGIC.into(),
            doc: "\"RKLK\" as a little-endian u32",
        },
        Constant {
            name: "RK_LINK_VERSION",
            value: LINK_VERSION.into(),
            doc: "link control layout version",
        },
        Constant {
            name: "RK_LINK_CONTROL_SIZE",
            value: LINK_CONTROL_SIZE as u64,
            doc: "size of rk_link_control",
        },
        Constant {
            name: "RK_LINK_FENCED",
            value: LINK_FENCED,
            doc: "fence bit of a link's commit word (epoch << 48 | consumed << 1 | fenced)",
        },
        Constant {
            name: "RK_LINK_CONSUMED_BITS",
            value: LINK_CONSUMED_BITS.into(),
            doc: "bits of the consumed count in a link's commit word",
        },
        Constant {
            name: "RK_LINK_RECEIVER_GONE",
            value: LINK_RECEIVER_GONE,
            doc: "closed bit: the receiver is gone for good",
        },
        Constant {
            name: "RK_LINK_SENDER_GONE",
            value: LINK_SENDER_GONE,
            doc: "closed bit: the sender is gone for good",
        },
        Constant {
            name: "RK_MAX_SLOT_LINKS",
            value: MAX_SLOT_LINKS as u64,
            doc: "rows of a link table each way (inbound, outbound)",
        },
        Constant {
            name: "RK_LINK_TABLE_ROWS_AT",
            value: LINK_TABLE_ROWS_AT as u64,
            doc: "offset of a link table's first (inbound) row",
        },
        Constant {
            name: "RK_LINK_ROW_REPORTS_FAILURES",
            value: LINK_ROW_REPORTS_FAILURES.into(),
            doc: "link row flag: a send the link has no room for is a dead letter",
        },
        Constant {
            name: "RK_ORIGIN_LINK",
            value: ORIGIN_LINK,
            doc: "seq of a routed send made while serving a link message: this bit | link id << 40 | position",
        },
        Constant {
            name: "RK_DOORBELL_AWAKE",
            value: AWAKE.into(),
            doc: "doorbell: the loop is running",
        },
        Constant {
            name: "RK_DOORBELL_PARKED",
            value: PARKED.into(),
            doc: "doorbell: the loop is going to sleep",
        },
        Constant {
            name: "RK_DOORBELL_NAPPING",
            value: NAPPING.into(),
            doc: "doorbell: the cpu loop naps (only RK_DOORBELL_PARKED wakes on a tell)",
        },
        Constant {
            name: "RK_HLC_LOGICAL_BITS",
            value: LOGICAL_BITS.into(),
            doc: "low bits of the HLC word that count",
        },
        Constant {
            name: "RK_HLC_LOGICAL_MASK",
            value: LOGICAL_MASK,
            doc: "mask of the logical counter",
        },
    ];
    for s in LifecycleState::ALL {
        let name = match s {
            LifecycleState::Created => "RK_STATE_CREATED",
            LifecycleState::Launched => "RK_STATE_LAUNCHED",
            LifecycleState::Active => "RK_STATE_ACTIVE",
            LifecycleState::Deactivated => "RK_STATE_DEACTIVATED",
            LifecycleState::Terminated => "RK_STATE_TERMINATED",
            LifecycleState::Faulted => "RK_STATE_FAULTED",
        };
        c.push(Constant {
            name,
            value: s as u32 as u64,
            doc: "lifecycle state",
        });
    }
    for (name, code) in [
        ("RK_FAULT_NONE", FaultCode::None),
        ("RK_FAULT_HANDLER_PANIC", FaultCode::HandlerPanic),
        ("RK_FAULT_HANDLER_FAULT", FaultCode::HandlerFault),
        ("RK_FAULT_BAD_ENVELOPE", FaultCode::BadEnvelope),
        (
            "RK_FAULT_UNKNOWN_MESSAGE_TYPE",
            FaultCode::UnknownMessageType,
        ),
        ("RK_FAULT_WATCHDOG", FaultCode::Watchdog),
        ("RK_FAULT_DEVICE_ERROR", FaultCode::DeviceError),
        ("RK_FAULT_UNEXPECTED_EXIT", FaultCode::UnexpectedExit),
    ] {
        c.push(Constant {
            name,
            value: code.to_u32().into(),
            doc: "fault code",
        });
    }
    c
}

/// The text of `device/include/ringkernel_protocol.h`.
pub fn c_header() -> String {
    let mut h = String::new();
    let w = &mut h;
    // Writing to a String cannot fail.
    let _ = writeln!(
        w,
        "/* ringkernel protocol layouts — GENERATED from the Rust core (src/layout.rs).\n \
         * Do not edit: regenerate with `RINGKERNEL_BLESS=1 cargo test --test c_header`.\n \
         *\n \
         * Little-endian. Every struct's size, alignment and field offsets are\n \
         * asserted below from Rust's offset_of!, so a disagreement fails the build.\n \
         * Fields named in comments as atomics are accessed only with acquire/release\n \
         * operations (ld.acquire.sys / st.release.sys on CUDA); see docs/protocol.md.\n \
         */\n\
         #ifndef RINGKERNEL_PROTOCOL_H\n#define RINGKERNEL_PROTOCOL_H\n\n\
         #if defined(__CUDACC_RTC__)\n\
         /* NVRTC: no standard headers at run time. */\n\
         typedef unsigned char uint8_t;\ntypedef unsigned short uint16_t;\n\
         typedef unsigned int uint32_t;\ntypedef unsigned long long uint64_t;\n\
         typedef int int32_t;\ntypedef long long int64_t;\n\
         #define RK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)\n\
         /* NVRTC has no constant offsetof: offsets are asserted by every other compiler. */\n\
         #define RK_ASSERT_OFFSET(t, f, n)\n\
         #define RK_ALIGNAS(n) alignas(n)\n#define RK_ALIGNOF(t) alignof(t)\n\
         #elif defined(__cplusplus)\n#include <cstddef>\n#include <cstdint>\n\
         #define RK_STATIC_ASSERT(cond, msg) static_assert(cond, msg)\n\
         #define RK_ALIGNAS(n) alignas(n)\n#define RK_ALIGNOF(t) alignof(t)\n\
         #else\n#include <stddef.h>\n#include <stdint.h>\n\
         #define RK_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)\n\
         #define RK_ALIGNAS(n) _Alignas(n)\n#define RK_ALIGNOF(t) _Alignof(t)\n\
         #endif\n\
         #ifndef RK_ASSERT_OFFSET\n\
         #define RK_ASSERT_OFFSET(t, f, n) RK_STATIC_ASSERT(offsetof(t, f) == (n), \"offsetof \" #t \".\" #f)\n\
         #endif\n"
    );
    for c in constants() {
        let _ = writeln!(
            w,
            "#define {:<32} {:#x}ull /* {} */",
            c.name, c.value, c.doc
        );
    }
    for s in structs() {
        let _ = writeln!(w, "\n/* {} */\ntypedef struct {} {{", s.doc, s.c_name);
        let mut cursor = 0;
        let mut pad = 0;
        let natural = s.fields.iter().map(|f| f.size).max().unwrap_or(1);
        for (i, f) in s.fields.iter().enumerate() {
            if f.offset > cursor {
                let _ = writeln!(w, "    uint8_t _pad{pad}[{}];", f.offset - cursor);
                pad += 1;
            }
            let align = if i == 0 && s.align > natural {
                format!("RK_ALIGNAS({}) ", s.align)
            } else {
                String::new()
            };
            let _ = writeln!(
                w,
                "    {align}{} {}; /* offset {} */",
                f.c_type, f.name, f.offset
            );
            cursor = f.offset + f.size;
        }
        if s.size > cursor {
            let _ = writeln!(w, "    uint8_t _pad{pad}[{}];", s.size - cursor);
        }
        let _ = writeln!(w, "}} {};", s.c_name);
        let _ = writeln!(
            w,
            "RK_STATIC_ASSERT(sizeof({0}) == {1}, \"sizeof {0}\");",
            s.c_name, s.size
        );
        let _ = writeln!(
            w,
            "RK_STATIC_ASSERT(RK_ALIGNOF({0}) == {1}, \"alignof {0}\");",
            s.c_name, s.align
        );
        for f in &s.fields {
            let _ = writeln!(
                w,
                "RK_ASSERT_OFFSET({0}, {1}, {2});",
                s.c_name, f.name, f.offset
            );
        }
    }
    let _ = writeln!(w, "\n#endif /* RINGKERNEL_PROTOCOL_H */");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_types_match_rust_field_sizes_and_fields_do_not_overlap() {
        for s in structs() {
            let mut end = 0;
            for f in &s.fields {
                let c_size = match f.c_type {
                    "uint8_t" => 1,
                    "uint16_t" => 2,
                    "uint32_t" => 4,
                    "uint64_t" => 8,
                    other => panic!("unexpected C type {other}"),
                };
                assert_eq!(c_size, f.size, "{}.{}", s.c_name, f.name);
                assert_eq!(
                    f.offset % f.size,
                    0,
                    "{}.{} is naturally aligned",
                    s.c_name,
                    f.name
                );
                assert!(
                    f.offset >= end,
                    "{}.{} overlaps its predecessor",
                    s.c_name,
                    f.name
                );
                end = f.offset + f.size;
            }
            assert!(end <= s.size);
        }
    }

    /// The layout the docs promise: counters and control lines on separate
    /// 128-byte lines.
    #[test]
    fn documented_offsets() {
        let all = structs();
        let find = |s: &str, f: &str| {
            let st = all.iter().find(|x| x.c_name == s).unwrap();
            st.fields.iter().find(|x| x.name == f).unwrap().offset
        };
        assert_eq!(size_of::<EnvelopeHeader>(), 64);
        assert_eq!(
            [
                "magic",
                "version",
                "flags",
                "type_id",
                "payload_len",
                "clock_domain",
                "correlation",
                "src",
                "dst",
                "hlc",
                "seq",
                "trace_id"
            ]
            .map(|f| find("rk_envelope_header", f)),
            [0, 2, 3, 4, 8, 12, 16, 24, 32, 40, 48, 56]
        );
        assert_eq!(
            (size_of::<RingHeader>(), align_of::<RingHeader>()),
            (RING_HEADER_SIZE, 128)
        );
        assert_eq!(
            ["tail", "head", "magic", "slot_size"].map(|f| find("rk_ring_header", f)),
            [0, 128, 256, 268]
        );
        assert_eq!(
            (size_of::<ControlBlock>(), align_of::<ControlBlock>()),
            (CONTROL_BLOCK_SIZE, 128)
        );
        assert_eq!(
            [
                "requested_state",
                "incarnation",
                "acked_state",
                "heartbeat",
                "processed",
                "fault_detail",
                "commit",
                "serving",
                "serving_correlation",
                "doorbell"
            ]
            .map(|f| find("rk_control_block", f)),
            [8, 12, 128, 144, 152, 160, 168, 176, 184, 256]
        );
        assert_eq!(
            (size_of::<LinkControl>(), align_of::<LinkControl>()),
            (LINK_CONTROL_SIZE, 128)
        );
        assert_eq!(
            [
                "commit",
                "closed",
                "magic",
                "version",
                "capacity",
                "publishing"
            ]
            .map(|f| find("rk_link_control", f)),
            [0, 128, 136, 140, 144, 148]
        );
        assert_eq!(
            (size_of::<LinkRow>(), size_of::<LinkTable>()),
            (64, LINK_TABLE_ROWS_AT + 2 * 64 * MAX_SLOT_LINKS)
        );
        assert_eq!(
            [
                "control", "ring", "peer", "served", "n_served", "id", "flags", "capacity"
            ]
            .map(|f| find("rk_link_row", f)),
            [0, 8, 16, 24, 32, 36, 40, 44]
        );
        assert_eq!(
            ["generation", "n_in", "n_out", "seen"].map(|f| find("rk_link_table", f)),
            [0, 8, 12, 16]
        );
    }
}
