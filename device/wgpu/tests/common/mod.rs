//! What the wgpu tests share: the fold kernel, and opening the device or a
//! runtime on it — skipping with the reason without an adapter, failing
//! instead under `RINGKERNEL_REQUIRE_WGPU=1` (as in CI, on lavapipe).
#![allow(dead_code)]

use ringkernel::runtime::Runtime;
use ringkernel_wgpu::{WgpuBackend, WgpuDevice, WgpuError, WgslKernel};

/// State [s, count]: `s = s * 31 + m` for each message (wrapping) — an
/// update that does not commute, so any reordering or parallel application
/// shows — answering asks with [s, count]; `m = 0xDEAD` faults (code 7);
/// `m = 0xD0D00000` answers nothing.
pub const FOLD: WgslKernel = WgslKernel {
    name: "fold",
    state_words: 2,
    handler: r#"
fn rk_handle(state: ptr<function, array<u32, RK_STATE_WORDS>>, msg: Envelope, reply: ptr<function, Reply>, later: ptr<function, Later>) -> u32 {
    let m = msg.payload[0];
    if m == 0xDEADu {
        return RK_FAULT + 7u;
    }
    if m == 0xD0D00000u {
        return RK_DONE;
    }
    (*state)[0] = (*state)[0] * 31u + m;
    (*state)[1] = (*state)[1] + 1u;
    (*reply).len = 8u;
    (*reply).payload[0] = (*state)[0];
    (*reply).payload[1] = (*state)[1];
    return RK_REPLIED;
}
"#,
    max_later: 0,
    width: 1,
};

fn skipped(e: WgpuError) {
    assert!(
        std::env::var("RINGKERNEL_REQUIRE_WGPU").as_deref() != Ok("1"),
        "RINGKERNEL_REQUIRE_WGPU=1 and {e}"
    );
    eprintln!("skipped: {e} (install mesa-vulkan-drivers for lavapipe)");
}

/// The device, or `None` (skipped) without an adapter.
pub fn device() -> Option<WgpuDevice> {
    WgpuDevice::new()
        .inspect(|d| eprintln!("adapter: {}", d.adapter()))
        .map_err(skipped)
        .ok()
}

/// The wgpu backend, or `None` (skipped) without an adapter.
pub fn backend() -> Option<std::sync::Arc<WgpuBackend>> {
    let backend = WgpuBackend::new().map_err(skipped).ok()?;
    eprintln!("adapter: {}", backend.device().adapter());
    Some(backend)
}

/// A runtime on the wgpu backend, or `None` (skipped) without an adapter.
pub fn runtime() -> Option<Runtime> {
    Some(Runtime::builder().device(backend()?).build().unwrap())
}
