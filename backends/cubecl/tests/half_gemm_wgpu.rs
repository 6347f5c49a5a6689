//! f16 matrix products through cubek's matmul with half inputs and f32 accumulation (the
//! element setup the tensor-core path uses on CUDA), on wgpu (lavapipe in CI, which has no
//! tensor cores, so the test names cubek's unit kernel through `LISA_CUBECL_HALF_GEMM`), against
//! the CPU backend: matmul with every transpose and a batch, and the convolutions whose GEMMs
//! go the same way.
#![cfg(feature = "wgpu")]

mod common;

use common::{assert_close, values};
use lisa_core::backend::prelude::*;
use lisa_core::backend::{Conv2dParams, DType, Shape, Transpose};
use lisa_core::tolerance::backend_vs_reference;
use lisa_cpu::CpuBackend as C;
use lisa_cubecl::{HalfMatmul, WgpuBackend as W, half_matmul};

#[test]
fn half_products_through_cubek_match_the_cpu_backend() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    let device = W::probe().unwrap();
    if !device.supports(DType::F16) {
        eprintln!("skipped: this wgpu adapter has no f16");
        return;
    }
    assert!(!device.has_tensor_cores(DType::F16) || device.runtime_name() != "wgpu<wgsl>", "WGSL has no CMMA");
    assert!(!device.has_tensor_cores(DType::F32), "f32 inputs never count as half tensor cores");
    // SAFETY: set before any product runs (the knob is read once per process) and this test
    // binary holds only this test.
    unsafe { std::env::set_var("LISA_CUBECL_HALF_GEMM", "simple_unit") };
    assert_eq!(half_matmul(&device, DType::F16), HalfMatmul::Named);
    let cpu = C::default_device();
    let tol = backend_vs_reference(DType::F16);
    // Shapes that are not multiples of cubek's tiles, with each transpose.
    let (b, m, k, n) = (3, 37, 70, 29);
    for t in [
        Transpose { a: false, b: false },
        Transpose { a: true, b: false },
        Transpose { a: false, b: true },
        Transpose { a: true, b: true },
    ] {
        let sa = if t.a { Shape::new([b, k, m]) } else { Shape::new([b, m, k]) };
        let sb = if t.b { Shape::new([b, n, k]) } else { Shape::new([b, k, n]) };
        let (ha, hb) = (values(b * m * k, 1), values(b * k * n, 2));
        let got = W::matmul(
            &W::from_slice(&ha, &sa, DType::F16, &device).unwrap(),
            &W::from_slice(&hb, &sb, DType::F16, &device).unwrap(),
            t,
        )
        .unwrap();
        let want = C::matmul(
            &C::from_slice(&ha, &sa, DType::F16, &cpu).unwrap(),
            &C::from_slice(&hb, &sb, DType::F16, &cpu).unwrap(),
            t,
        )
        .unwrap();
        assert_eq!(W::dtype(&got), DType::F16);
        assert_close(&format!("matmul {t:?}"), &W::to_vec(&got).unwrap(), &C::to_vec(&want).unwrap(), tol);
    }
    // A 3×3 convolution and its two backward GEMMs.
    let (xs, ws) = (Shape::new([2, 6, 9, 9]), Shape::new([5, 6, 3, 3]));
    let p = Conv2dParams::same(3);
    let (hx, hw, hg) = (values(2 * 6 * 81, 3), values(5 * 6 * 9, 4), values(2 * 5 * 81, 5));
    let ys = Shape::new([2, 5, 9, 9]);
    let on_w = |h: &[f32], s: &Shape| W::from_slice(h, s, DType::F16, &device).unwrap();
    let on_c = |h: &[f32], s: &Shape| C::from_slice(h, s, DType::F16, &cpu).unwrap();
    let pairs = [
        (
            "conv2d",
            W::conv2d(&on_w(&hx, &xs), &on_w(&hw, &ws), None, p).unwrap(),
            C::conv2d(&on_c(&hx, &xs), &on_c(&hw, &ws), None, p).unwrap(),
        ),
        (
            "conv2d_backward_data",
            W::conv2d_backward_data(&on_w(&hg, &ys), &on_w(&hw, &ws), &xs, p).unwrap(),
            C::conv2d_backward_data(&on_c(&hg, &ys), &on_c(&hw, &ws), &xs, p).unwrap(),
        ),
        (
            "conv2d_backward_weight",
            W::conv2d_backward_weight(&on_w(&hx, &xs), &on_w(&hg, &ys), &ws, p).unwrap(),
            C::conv2d_backward_weight(&on_c(&hx, &xs), &on_c(&hg, &ys), &ws, p).unwrap(),
        ),
    ];
    for (what, got, want) in pairs {
        // The weight gradient sums 2·81 products per element: the half output's rounding
        // dominates, as in the f16 conformance checks.
        assert_close(what, &W::to_vec(&got).unwrap(), &C::to_vec(&want).unwrap(), tol);
    }
    assert_eq!(lisa_cubecl::cubek_refusals(), 0, "a product fell back to the tiled kernel");
}
