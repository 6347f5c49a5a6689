//! Tells the tests whether this machine has an NVIDIA driver: without one, the CUDA suite is
//! compiled with its tests marked `#[ignore]`, so that they count as ignored, not passed.
//! (`LISA_REQUIRE_CUDA=1` at build time marks them as runnable anyway; on a GPU machine,
//! binaries built elsewhere run them with `-- --include-ignored`.)

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lisa_cuda_driver)");
    println!("cargo::rerun-if-env-changed=LISA_REQUIRE_CUDA");
    // A missing path in rerun-if-changed makes cargo rerun this script, and rebuild this crate
    // and every crate above it, on every invocation: watch the driver file only where it
    // exists. (A driver installed after the first build: `cargo clean -p lisa-cubecl`.)
    let version = std::path::Path::new("/proc/driver/nvidia/version");
    if version.exists() {
        println!("cargo::rerun-if-changed=/proc/driver/nvidia/version");
    } else {
        println!("cargo::rerun-if-changed=build.rs");
    }
    let driver = version.exists()
        || std::path::Path::new("/dev/nvidiactl").exists()
        || std::env::var("LISA_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    if driver {
        println!("cargo::rustc-cfg=lisa_cuda_driver");
    }
}
