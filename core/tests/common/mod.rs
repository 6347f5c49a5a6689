//! Helpers shared by the core's integration tests. Tolerances live in `lisa_core::tolerance`.
#![allow(dead_code)]

use lisa_core::tolerance::Tolerance;

/// Asserts `got ≈ want` element by element under `tol`, naming the first failure.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: Tolerance) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(tol.accepts(g, w), "{what}[{i}]: got {g}, want {w} (tol {tol:?})");
    }
}

/// Asserts one scalar.
pub fn assert_close1(what: &str, got: f64, want: f64, tol: Tolerance) {
    assert!(tol.accepts(got, want), "{what}: got {got}, want {want} (tol {tol:?})");
}

/// Central finite difference of `f` at `x` along every coordinate.
pub fn central_difference(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            probe[i] = x[i] + h;
            let up = f(&probe);
            probe[i] = x[i] - h;
            let down = f(&probe);
            probe[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}
