//! The C header is generated from Rust's layout, compiles as C11 and C++17
//! with the host compiler, and the bytes C writes through it decode in Rust.

use ringkernel::control::{ControlBlock, FaultCode, LifecycleState};
use ringkernel::envelope::{Envelope, Flags, HeaderCheck};
use ringkernel::id::{ActorId, ActorKind, ClockDomain, CorrelationId};
use ringkernel::layout::{C_HEADER_PATH, c_header};
use ringkernel::link::{LINK_SENDER_GONE, LinkControl};
use ringkernel::region::{HeapRegion, SharedMemory};
use ringkernel::ring::Ring;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_header_is_generated_from_rust() {
    let path = root().join(C_HEADER_PATH);
    let generated = c_header();
    if std::env::var_os("RINGKERNEL_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{C_HEADER_PATH} is stale: run `RINGKERNEL_BLESS=1 cargo test --test c_header` and commit it"
    );
}

/// Builds tests/c/protocol_check.c with the host compiler (as C or C++) and
/// returns what it prints.
fn compile_and_run(cpp: bool) -> String {
    let out_dir = std::env::temp_dir().join(format!("ringkernel-c-header-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let compiler = cc::Build::new()
        .cpp(cpp)
        .cargo_metadata(false)
        .target(env!("RINGKERNEL_TARGET"))
        .host(env!("RINGKERNEL_HOST"))
        .opt_level(0)
        .out_dir(&out_dir)
        .get_compiler();
    let exe = out_dir.join(if cpp { "check_cpp" } else { "check_c" });
    let mut cmd = compiler.to_command();
    if cpp {
        cmd.args(["-x", "c++", "-std=c++17"]);
    } else {
        cmd.args(["-std=c11"]);
    }
    cmd.args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(root().join("device/include"))
        .arg(root().join("tests/c/protocol_check.c"))
        .arg("-o")
        .arg(&exe);
    let status = cmd.status().expect("the host C compiler runs");
    assert!(
        status.success(),
        "compiling the protocol header failed ({cmd:?})"
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn record(output: &str, name: &str) -> Vec<u8> {
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .expect(name);
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
        .collect()
}

fn check_bytes_from_c(output: &str) {
    // The envelope C wrote decodes and validates in Rust, field by field.
    let slot = record(output, "envelope");
    let env = Envelope::decode(&slot, &HeaderCheck::only(64, &[0x0102_0304])).unwrap();
    let h = env.header;
    assert_eq!(h.flags, Flags::ASK | Flags::FAULT);
    assert_eq!(h.clock_domain, ClockDomain::unit(7, 3));
    assert_eq!(h.correlation, CorrelationId::new(1, 5, 9));
    assert_eq!(h.src, ActorId::new(1, ActorKind::Cpu, 2, 0));
    assert_eq!(h.dst, ActorId::new(1, ActorKind::Gpu, 3, 4));
    assert_eq!(
        (h.hlc, h.seq, h.trace_id),
        (0x17A0_B0C0_D0E0_F001, 42, 0x0123_4567_89AB_CDEF)
    );
    assert_eq!(env.payload_as::<u64>().unwrap(), 0xCAFE_F00D_DEAD_BEEF);

    // A ring C initialised attaches in Rust, and its published slot pops.
    let ring = record(output, "ring");
    let region = HeapRegion::zeroed(ring.len());
    // SAFETY: the region is fresh and `ring.len()` bytes long.
    unsafe { std::ptr::copy_nonoverlapping(ring.as_ptr(), region.base().as_ptr(), ring.len()) };
    let region: Arc<dyn SharedMemory> = Arc::new(region);
    // SAFETY: the region is this test's and holds one ring; this is its only consumer.
    let mut rx = unsafe { Ring::attach_consumer(region, 0) }.unwrap();
    assert_eq!((rx.capacity(), rx.slot_size(), rx.len()), (4, 128, 1));
    let seq = rx
        .try_recv_with(&HeaderCheck::any_type(64), |e| e.header.seq)
        .unwrap()
        .unwrap();
    assert_eq!(seq, 42);

    // The control block C filled reads back through the Rust accessors.
    let bytes = record(output, "control");
    assert_eq!(bytes.len(), std::mem::size_of::<ControlBlock>());
    let mut cb = ControlBlock::new();
    // SAFETY: ControlBlock is repr(C) plain integers and atomics, every bit
    // pattern is valid for them, `bytes` is exactly its size, and `cb` is
    // exclusively ours.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut cb as *mut ControlBlock).cast::<u8>(),
            bytes.len(),
        )
    };
    assert!(cb.is_valid());
    assert_eq!(cb.requested_state(), Ok(LifecycleState::Active));
    let st = cb.status().unwrap();
    assert_eq!(
        (
            st.state,
            st.fault,
            st.fault_detail,
            st.heartbeat,
            st.processed
        ),
        (LifecycleState::Faulted, FaultCode::HandlerFault, 77, 5, 4)
    );
    assert!(cb.doorbell().is_parked());

    // The link control words C filled read back through the Rust accessors.
    let bytes = record(output, "link");
    assert_eq!(bytes.len(), std::mem::size_of::<LinkControl>());
    let mut lc = LinkControl::new(0);
    // SAFETY: LinkControl is repr(C) plain integers and atomics, every bit
    // pattern is valid for them, `bytes` is exactly its size, and `lc` is
    // exclusively ours.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut lc as *mut LinkControl).cast::<u8>(),
            bytes.len(),
        )
    };
    assert_eq!(lc.commit_state(), (3, 9, true));
    assert_eq!(lc.closed(), LINK_SENDER_GONE);
    assert_eq!(lc.capacity(), 64);
    assert!(lc.is_valid());
}

#[test]
fn header_compiles_as_c11_and_its_bytes_decode_in_rust() {
    check_bytes_from_c(&compile_and_run(false));
}

#[test]
fn header_compiles_as_cpp17_and_its_bytes_decode_in_rust() {
    check_bytes_from_c(&compile_and_run(true));
}

#[test]
fn header_mentions_every_struct_and_asserts_every_offset() {
    let text = c_header();
    for s in ringkernel::layout::structs() {
        for f in &s.fields {
            let line = format!("RK_ASSERT_OFFSET({}, {}, {});", s.c_name, f.name, f.offset);
            assert!(text.contains(&line), "missing: {line}");
        }
        assert!(text.contains(&format!("sizeof({}) == {}", s.c_name, s.size)));
    }
    assert!(Path::new(&root().join(C_HEADER_PATH)).exists());
}
