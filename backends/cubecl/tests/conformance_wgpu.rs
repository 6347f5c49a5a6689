//! The shared backend conformance suite on wgpu (lavapipe in CI). Without an adapter the
//! tests skip with the reason, except under `CI=true`, where they fail.
#![cfg(feature = "wgpu")]

lisa_conformance::conformance_tests!(
    lisa_cubecl::WgpuBackend,
    skip_unless = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>
);
