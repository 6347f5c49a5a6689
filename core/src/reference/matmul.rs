use alloc::vec;
use alloc::vec::Vec;

use super::expect_len;
use crate::Result;
use crate::backend::Shape;
use crate::backend::geometry::{MatmulGeometry, Transpose};

/// Batched `op(a)·op(b)` (f64 accumulation); returns the output and its shape.
pub fn matmul(a: &[f32], a_shape: &Shape, b: &[f32], b_shape: &Shape, t: Transpose) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "matmul";
    expect_len(OP, a, a_shape)?;
    expect_len(OP, b, b_shape)?;
    let g = MatmulGeometry::new(OP, a_shape, b_shape, t)?;
    let (m, k, n) = (g.m, g.k, g.n);
    // Element (i, p) of op(a) and (p, j) of op(b) within one batch entry.
    let a_at = |i: usize, p: usize| if t.a { p * m + i } else { i * k + p };
    let b_at = |p: usize, j: usize| if t.b { j * k + p } else { p * n + j };
    let mut out = vec![0.0f32; g.batch * m * n];
    for bi in 0..g.batch {
        let (ab, bb) = (&a[bi * m * k..(bi + 1) * m * k], &b[bi * k * n..(bi + 1) * k * n]);
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| ab[a_at(i, p)] as f64 * bb[b_at(p, j)] as f64).sum();
                out[bi * m * n + i * n + j] = s as f32;
            }
        }
    }
    Ok((out, g.output_shape()))
}
