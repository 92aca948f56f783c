//! The device loop under gcc's ThreadSanitizer: `tests/c/tsan_harness.cpp`
//! runs the very `kernels/*.cuh` the c-host backend and nvcc compile
//! against a host side in C++ (rings, control block, fence, slot
//! reassignment), built with `-fsanitize=thread`. A second build with one
//! acquire weakened to relaxed must be reported: the check can fail.
//!
//! Without a compiler that supports `-fsanitize=thread` the tests skip with
//! the reason — or fail, under `RINGKERNEL_REQUIRE_TSAN=1` (as in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the harness with ThreadSanitizer against the loop in `kernels`;
/// `None` when the toolchain cannot (skipped).
fn build(kernels: &Path, exe: &Path) -> Option<()> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-g", "-fsanitize=thread", "-pthread"])
        .args(["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-tsan"])
        .arg("-I")
        .arg(manifest().join("../include"))
        .arg("-I")
        .arg(kernels)
        .arg(manifest().join("tests/c/tsan_harness.cpp"))
        .arg("-o")
        .arg(exe)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(()),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var("RINGKERNEL_REQUIRE_TSAN").as_deref() != Ok("1"),
                "RINGKERNEL_REQUIRE_TSAN=1 and the ThreadSanitizer build failed:\n{why}"
            );
            eprintln!("skipped: no ThreadSanitizer build ({cxx}): {why}");
            None
        }
    }
}

fn run(exe: &Path) -> (bool, String) {
    let out = Command::new(exe)
        .env("TSAN_OPTIONS", "halt_on_error=1 exitcode=66")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_device_loop_is_clean_under_thread_sanitizer() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let exe = dir.join("tsan_harness");
    if build(&manifest().join("kernels"), &exe).is_none() {
        return;
    }
    let (ok, text) = run(&exe);
    assert!(ok, "the harness failed or TSan reported:\n{text}");
    assert!(!text.contains("ThreadSanitizer"), "{text}");
    eprintln!("{}", text.trim());
}

#[test]
fn thread_sanitizer_reports_a_weakened_acquire() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tsan-mutant");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in ringkernel_cuda::kernels::ALL {
        std::fs::write(dir.join(name), text).unwrap();
    }
    // The consumer's refresh of the H2K tail, made relaxed: its slot reads
    // no longer happen after the producer's writes.
    let path = dir.join("rk_loop.cuh");
    let text = std::fs::read_to_string(&path).unwrap();
    let acquire = "r->cached = rk_ld_acquire_u64(&r->h->tail);";
    assert!(text.contains(acquire), "the mutation site moved");
    std::fs::write(
        &path,
        text.replace(acquire, "r->cached = rk_ld_relaxed_u64(&r->h->tail);"),
    )
    .unwrap();
    let exe = dir.join("tsan_mutant");
    if build(&dir, &exe).is_none() {
        return;
    }
    let (ok, text) = run(&exe);
    assert!(
        !ok && text.contains("WARNING: ThreadSanitizer: data race"),
        "TSan missed the weakened acquire:\n{text}"
    );
}
