//! The fused attention kernels on wgpu (lavapipe in CI) at SD's head dims and sequence
//! shapes, against the CPU backend: which sizes run fused (they keep the log-sum-exp), that
//! a size beyond the device's shared memory falls back to the chunked path with the same
//! results, and f16 storage.
#![cfg(feature = "wgpu")]

mod common;

use common::{assert_close, values};
use lisa_core::backend::prelude::*;
use lisa_core::backend::{AttentionDims, AttentionParams, DType, Shape};
use lisa_core::tolerance::backend_vs_reference;
use lisa_cpu::CpuBackend as C;
use lisa_cubecl::WgpuBackend as W;

/// Forward and backward of one case on wgpu against lisa-cpu; returns whether it ran fused.
fn check(g: usize, tq: usize, tk: usize, d: usize, causal: bool, dtype: DType) -> bool {
    let device = W::probe().unwrap();
    let cpu = C::default_device();
    let params = AttentionParams { causal, ..AttentionParams::new(d) };
    let (sq, sk, so) = (Shape::new([g, tq, d]), Shape::new([g, tk, d]), Shape::new([g, tq, d]));
    let host = [values(g * tq * d, 1), values(g * tk * d, 2), values(g * tk * d, 3), values(g * tq * d, 4)];
    let shapes = [&sq, &sk, &sk, &so];
    let w: Vec<_> = host.iter().zip(shapes).map(|(h, s)| W::from_slice(h, s, dtype, &device).unwrap()).collect();
    let c: Vec<_> = host.iter().zip(shapes).map(|(h, s)| C::from_slice(h, s, dtype, &cpu).unwrap()).collect();
    let what = format!("g{g} q{tq} k{tk} d{d} causal={causal} {dtype:?}");
    let fused = W::attention_is_fused(&device, AttentionDims::new("test", &sq, &sk, &sk, params).unwrap());
    let fw = W::attention_forward(&w[0], &w[1], &w[2], params).unwrap();
    let fc = C::attention_forward(&c[0], &c[1], &c[2], params).unwrap();
    assert_eq!(fw.lse.is_some(), fused, "{what}: the fused kernels keep the log-sum-exp, the fallback does not");
    let tol = backend_vs_reference(dtype);
    assert_close(&format!("{what} out"), &W::to_vec(&fw.out).unwrap(), &C::to_vec(&fc.out).unwrap(), tol);
    if let (Some(lw), Some(lc)) = (&fw.lse, &fc.lse) {
        assert_close(&format!("{what} lse"), &W::to_vec(lw).unwrap(), &C::to_vec(lc).unwrap(), tol);
    }
    let gw = W::attention_backward(&w[0], &w[1], &w[2], &fw, &w[3], params).unwrap();
    let gc = C::attention_backward(&c[0], &c[1], &c[2], &fc, &c[3], params).unwrap();
    for (name, a, b) in [("dq", &gw.q, &gc.q), ("dk", &gw.k, &gc.k), ("dv", &gw.v, &gc.v)] {
        assert_close(&format!("{what} {name}"), &W::to_vec(a).unwrap(), &C::to_vec(b).unwrap(), tol);
    }
    fused
}

#[test]
fn fused_attention_at_sd_head_dims_matches_the_cpu_backend() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    // SD 1.5's head dims (40, 80, 160), SD 2.x's (64), SD3's (64) and 128; self-attention
    // and cross-attention onto 77 text tokens; CLIP's causal self-attention.
    for d in [40, 64, 80, 128, 160] {
        assert!(check(2, 100, 100, d, false, DType::F32), "d = {d} runs fused");
        assert!(check(2, 100, 77, d, false, DType::F32), "d = {d} cross-attention runs fused");
    }
    assert!(check(3, 77, 77, 64, true, DType::F32), "causal runs fused");
    if W::supports_dtype(&W::probe().unwrap(), DType::F16) {
        assert!(check(2, 100, 77, 40, false, DType::F16), "f16 runs fused");
        assert!(check(2, 50, 50, 64, true, DType::F16), "f16 causal runs fused");
    }
}

#[test]
fn attention_wider_than_shared_memory_falls_back_to_the_chunked_path() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    // 4·16² + 16·4096 floats = 266 KiB: more shared memory than any device offers.
    assert!(!check(1, 20, 30, 4096, false, DType::F32), "d = 4096 falls back");
}
