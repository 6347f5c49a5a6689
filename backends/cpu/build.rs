//! Tells the tests whether this machine's CPU has AVX-512F: without it, the tests of the direct
//! convolution kernel (which needs it) are compiled `#[ignore]`d, so that they count as ignored,
//! not passed. `/proc/cpuinfo`'s time stamp changes only when the machine boots, so a target
//! folder carried to another machine reruns this script.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lisa_host_avx512)");
    let cpuinfo = std::path::Path::new("/proc/cpuinfo");
    if cpuinfo.exists() {
        println!("cargo::rerun-if-changed=/proc/cpuinfo");
    } else {
        println!("cargo::rerun-if-changed=build.rs");
    }
    let avx512 = std::fs::read_to_string(cpuinfo)
        .is_ok_and(|text| text.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "avx512f")));
    if avx512 {
        println!("cargo::rustc-cfg=lisa_host_avx512");
    }
}
