//! Helpers shared by the wgpu tests: deterministic inputs and element-wise comparison.
#![allow(dead_code)]

use lisa_core::tolerance::Tolerance;

/// Deterministic values in about [-1, 1].
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 8) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Every element within `tol`, naming the first one that is not.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!(tol.accepts(a as f64, b as f64), "{what}[{i}]: {a} vs {b} (tolerance {tol:?})");
    }
}
