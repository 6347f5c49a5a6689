use alloc::vec::Vec;

use super::expect_len;
use crate::backend::Shape;
use crate::{Error, Result};

fn last_dim(op: &'static str, shape: &Shape) -> Result<usize> {
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(Error::Empty { op }),
    }
}

/// Softmax over the last dimension (max-subtracted, f64 sums).
pub fn softmax_last(x: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    const OP: &str = "softmax_last";
    expect_len(OP, x, shape)?;
    let d = last_dim(OP, shape)?;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exps: Vec<f64> = row.iter().map(|&v| num_traits::Float::exp(v as f64 - max)).collect();
        let sum: f64 = exps.iter().sum();
        out.extend(exps.iter().map(|&e| (e / sum) as f32));
    }
    Ok(out)
}

/// Softmax backward from the output `y`: `dx = y ⊙ (g − Σ_last g ⊙ y)`.
pub fn softmax_last_backward(y: &[f32], grad: &[f32], shape: &Shape) -> Result<Vec<f32>> {
    const OP: &str = "softmax_last_backward";
    expect_len(OP, y, shape)?;
    expect_len(OP, grad, shape)?;
    let d = last_dim(OP, shape)?;
    let mut out = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks_exact(d).zip(grad.chunks_exact(d)) {
        let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
        out.extend(yr.iter().zip(gr).map(|(&a, &b)| (a as f64 * (b as f64 - dot)) as f32));
    }
    Ok(out)
}
