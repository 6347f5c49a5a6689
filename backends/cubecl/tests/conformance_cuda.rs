//! The shared backend conformance suite on CUDA. Built on a machine without an NVIDIA
//! driver (CI), its tests are ignored: the build is what is checked there. Where a driver is
//! but no usable GPU, each test skips with the reason, unless `LISA_REQUIRE_CUDA=1` makes a
//! missing GPU fatal. Binaries built elsewhere run the suite with `-- --include-ignored`.
#![cfg(feature = "cuda")]

fn ready() -> Option<String> {
    match lisa_cubecl::CudaBackend::probe() {
        Ok(_) => None,
        Err(e) if std::env::var("LISA_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("LISA_REQUIRE_CUDA=1: {e}"),
        Err(e) => Some(e.to_string()),
    }
}

lisa_conformance::conformance_tests!(
    lisa_cubecl::CudaBackend,
    skip_unless = ready,
    attrs = [cfg_attr(not(lisa_cuda_driver), ignore = "no NVIDIA driver on the machine this suite was built on")]
);
