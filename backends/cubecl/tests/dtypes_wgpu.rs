//! Storage types on wgpu: what the device reports is what ops accept. WGSL has no bf16, so
//! it is refused with a typed error before any launch (launching it would fail on the device
//! thread and read back garbage); f16 works where the adapter has `shader-f16`.
#![cfg(feature = "wgpu")]

use lisa_core::Error;
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cubecl::WgpuBackend as W;

#[test]
fn bf16_is_refused_before_launch_and_f16_follows_the_adapter() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    let device = W::probe().unwrap();
    let s = Shape::new([4]);
    assert!(!W::supports_dtype(&device, DType::BF16), "WGSL has no bf16");
    for op in [
        W::from_slice(&[1.0; 4], &s, DType::BF16, &device),
        W::full(&s, 1.0, DType::BF16, &device),
        W::random_normal(&s, 1, DType::BF16, &device),
        W::cast(&W::full(&s, 1.0, DType::F32, &device).unwrap(), DType::BF16),
    ] {
        assert!(matches!(op, Err(Error::UnsupportedDType { dtype: DType::BF16, .. })), "{op:?}");
    }
    let f16 = W::supports_dtype(&device, DType::F16);
    eprintln!("adapter {}: f16 {}", device.runtime_name(), if f16 { "supported" } else { "not supported" });
    if f16 {
        let x = W::from_slice(&[1.0, 2.5, -3.0, 65504.0], &s, DType::F16, &device).unwrap();
        let y = W::add(&x, &x).unwrap();
        assert_eq!(W::to_vec(&y).unwrap()[..3], [2.0, 5.0, -6.0]);
        assert!(W::to_vec(&y).unwrap()[3].is_infinite(), "f16 overflow rounds to inf, as f16 storage must");
    }
}
