//! Reductions with a fixed partition (thread-count independent) and the softmax.

use lisa_core::backend::Shape;
use lisa_core::{Error, Result};
use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::vectorised;
use crate::sums::sum_map;

/// `Σ x` in f64: fixed chunks summed in parallel, partials added in order.
pub(crate) fn sum(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x.par_chunks(CHUNK).map(|c| vectorised(|| sum_map(c, |v| v as f64))).collect();
    partials.iter().sum()
}

/// Sums `x` (of `shape`) down to `target`, which must broadcast to `shape`.
pub(crate) fn sum_to_shape(x: &[f32], shape: &Shape, target: &Shape) -> Result<Vec<f32>> {
    const OP: &str = "sum_to_shape";
    if target.rank() > shape.rank() || Shape::broadcast(OP, target, shape)? != *shape {
        return Err(Error::ShapeMismatch { op: OP, expected: shape.clone(), got: target.clone() });
    }
    let n_out = target.num_elements()?;
    if n_out == 0 || x.is_empty() {
        return Ok(vec![0.0; n_out]);
    }
    if target.num_elements()? == x.len() {
        return Ok(x.to_vec()); // nothing is reduced
    }
    // Split the input dims into kept (target extent > 1) and reduced ones.
    let dims = shape.dims();
    let in_strides = shape.strides();
    let t_strides = target.broadcast_strides(shape);
    let reduced = |d: usize| t_strides[d] == 0 && dims[d] > 1;
    // Trailing reduced dims form one contiguous run per output element (summed with the
    // vectorised lane sum); the other reduced dims enumerate the runs' starts.
    let mut run = 1usize;
    let mut inner_end = dims.len();
    while inner_end > 0 && (reduced(inner_end - 1) || dims[inner_end - 1] == 1) {
        run *= dims[inner_end - 1];
        inner_end -= 1;
    }
    let mut starts = vec![0usize];
    for d in (0..inner_end).filter(|&d| reduced(d)) {
        let stride = in_strides[d];
        starts = starts.iter().flat_map(|&o| (0..dims[d]).map(move |i| o + i * stride)).collect();
    }
    let kept: Vec<usize> = (0..inner_end).filter(|&d| t_strides[d] != 0).collect();
    let out: Vec<f32> = (0..n_out)
        .into_par_iter()
        .map(|o| {
            let mut rem = o;
            let mut base = 0;
            for &d in kept.iter().rev() {
                base += (rem % dims[d]) * in_strides[d];
                rem /= dims[d];
            }
            vectorised(|| starts.iter().map(|&s| sum_map(&x[base + s..base + s + run], |v| v as f64)).sum::<f64>())
                as f32
        })
        .collect();
    Ok(out)
}

/// Softmax over rows of length `d`.
pub(crate) fn softmax_last(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, row)| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for (o, &v) in o.iter_mut().zip(row) {
            *o = (v - max).exp();
            total += *o;
        }
        let inv = 1.0 / total;
        o.iter_mut().for_each(|v| *v *= inv);
    });
    out
}

/// Softmax backward over rows of length `d`: `dx = y ⊙ (g − Σ g ⊙ y)`.
pub(crate) fn softmax_last_backward(y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; y.len()];
    out.par_chunks_mut(d).zip(y.par_chunks(d)).zip(g.par_chunks(d)).for_each(|((o, y), g)| {
        let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = y * (g - dot);
        }
    });
    out
}
