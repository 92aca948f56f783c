//! Hands the target triple to the tests that compile the C header with the
//! host C compiler (the `cc` crate needs it outside a build script).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let host = std::env::var("HOST").unwrap_or_default();
    println!("cargo:rustc-env=RINGKERNEL_TARGET={target}");
    println!("cargo:rustc-env=RINGKERNEL_HOST={host}");
    println!("cargo:rerun-if-changed=build.rs");
}
