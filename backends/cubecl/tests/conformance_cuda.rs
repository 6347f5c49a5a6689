//! The shared backend conformance suite on CUDA. Without a driver or GPU the tests skip
//! with the reason, except under `CI=true`... which has no GPU: there only the build is
//! checked, so this suite skips unless `LISA_REQUIRE_CUDA=1` makes a missing GPU fatal.
#![cfg(feature = "cuda")]

fn ready() -> Option<String> {
    match lisa_cubecl::CudaBackend::probe() {
        Ok(_) => None,
        Err(e) if std::env::var("LISA_REQUIRE_CUDA").is_ok_and(|v| v == "1") => panic!("LISA_REQUIRE_CUDA=1: {e}"),
        Err(e) => Some(e.to_string()),
    }
}

lisa_conformance::conformance_tests!(lisa_cubecl::CudaBackend, skip_unless = ready);
