//! The WGSL mirror of the protocol agrees with the Rust layout (naga
//! reflection), and a handler that does not compile is a typed error with
//! naga's message. No GPU needed.

use ringkernel::envelope::EnvelopeHeader;
use ringkernel_wgpu::*;
use std::mem::offset_of;

const NOOP: WgslKernel = WgslKernel {
    name: "noop",
    state_words: 3,
    handler: "fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 { return RK_DONE; }",
    max_later: 0,
    width: 1,
};

/// (member name, offset) of struct `name` in `module`, and its size.
fn layout(module: &naga::Module, name: &str) -> (Vec<(String, u32)>, u32) {
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("struct {name} not in the module"));
    match &ty.inner {
        naga::TypeInner::Struct { members, span } => (
            members
                .iter()
                .map(|m| (m.name.clone().unwrap_or_default(), m.offset))
                .collect(),
            *span,
        ),
        other => panic!("{name} is not a struct: {other:?}"),
    }
}

fn offset(members: &[(String, u32)], name: &str) -> usize {
    members
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no member {name}"))
        .1 as usize
}

#[test]
fn the_wgsl_envelope_has_the_rust_offsets() {
    let module = NOOP.validate().unwrap();
    let (m, size) = layout(&module, "Envelope");
    assert_eq!(size as usize, SLOT_BYTES);
    assert_eq!(
        offset(&m, "magic_version_flags"),
        offset_of!(EnvelopeHeader, magic)
    );
    for (wgsl, rust) in [
        ("type_id", offset_of!(EnvelopeHeader, type_id)),
        ("payload_len", offset_of!(EnvelopeHeader, payload_len)),
        ("clock_domain", offset_of!(EnvelopeHeader, clock_domain)),
        ("correlation", offset_of!(EnvelopeHeader, correlation)),
        ("src", offset_of!(EnvelopeHeader, src)),
        ("dst", offset_of!(EnvelopeHeader, dst)),
        ("hlc", offset_of!(EnvelopeHeader, hlc)),
        ("seq", offset_of!(EnvelopeHeader, seq)),
        ("trace_id", offset_of!(EnvelopeHeader, trace_id)),
        ("payload", ringkernel::envelope::HEADER_SIZE),
    ] {
        assert_eq!(offset(&m, wgsl), rust, "{wgsl}");
    }
    // version and flags share the first word with the magic.
    assert_eq!(offset_of!(EnvelopeHeader, version), 2);
    assert_eq!(offset_of!(EnvelopeHeader, flags), 3);
}

#[test]
fn the_slot_cell_has_the_offsets_the_host_reads() {
    let module = NOOP.validate().unwrap();
    let (m, size) = layout(&module, "SlotCell");
    for (name, at) in [
        ("hlc", CELL_HLC),
        ("processed", CELL_PROCESSED),
        ("fault", CELL_FAULT),
        ("domain", CELL_DOMAIN),
        ("state", CELL_STATE),
    ] {
        assert_eq!(offset(&m, name), at, "{name}");
    }
    assert_eq!(size as usize, (CELL_STATE + 4 * 3).next_multiple_of(8));
}

#[test]
fn a_handler_that_does_not_compile_is_a_typed_error_with_nagas_message() {
    let bad = WgslKernel {
        name: "bad",
        state_words: 1,
        handler: "fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 { return undefined_thing; }",
        max_later: 0,
        width: 1,
    };
    match bad.validate() {
        Err(WgpuError::Shader { kernel, message }) => {
            assert_eq!(kernel, "bad");
            assert!(message.contains("undefined_thing"), "{message}");
        }
        other => panic!("expected a shader error, got {other:?}"),
    }
    let wrong_type = WgslKernel {
        name: "wrong",
        state_words: 1,
        handler: "fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 { return 1.5; }",
        max_later: 0,
        width: 1,
    };
    assert!(matches!(
        wrong_type.validate(),
        Err(WgpuError::Shader { .. })
    ));
}
