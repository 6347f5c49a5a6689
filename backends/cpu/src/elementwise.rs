//! Elementwise kernels: broadcast binary ops, affine, unary functions and their backward.

use lisa_core::Result;
use lisa_core::backend::{BinaryOp, Shape, UnaryOp};
use rayon::prelude::*;

use crate::CHUNK;

/// Strides of `src` as seen from the broadcast shape `out` (0 on stretched dims).
pub(crate) fn broadcast_strides(src: &Shape, out: &Shape) -> Vec<usize> {
    let offset = out.rank() - src.rank();
    let strides = src.strides();
    (0..out.rank())
        .map(|i| {
            if i < offset || src.dims()[i - offset] == 1 {
                0
            } else {
                strides[i - offset]
            }
        })
        .collect()
}

/// Offset of row `row` (multi-index over all dims but the last) under `strides`.
fn row_offset(dims: &[usize], strides: &[usize], mut row: usize) -> usize {
    let mut offset = 0;
    for d in (0..dims.len().saturating_sub(1)).rev() {
        offset += (row % dims[d]) * strides[d];
        row /= dims[d];
    }
    offset
}

/// `op(a, b)` into `out` of the broadcast shape `out_shape`.
pub(crate) fn binary(
    op: BinaryOp,
    a: &[f32],
    sa: &Shape,
    b: &[f32],
    sb: &Shape,
    out_shape: &Shape,
) -> Result<Vec<f32>> {
    let n = out_shape.num_elements()?;
    let mut out = vec![0.0f32; n];
    if n == 0 {
        return Ok(out);
    }
    // Fast paths: equal shapes, or one side a single element.
    if sa == sb {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((o, x), y)| {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    *o = op.apply(x, y);
                }
            });
        return Ok(out);
    }
    // General path: rows of the last output dim; each side steps by 0 or 1 inside a row.
    let dims = out_shape.dims();
    let (ta, tb) = (
        broadcast_strides(sa, out_shape),
        broadcast_strides(sb, out_shape),
    );
    let (last, inner_a, inner_b) = match dims.last() {
        Some(&l) => (l, *ta.last().unwrap_or(&0), *tb.last().unwrap_or(&0)),
        None => (1, 0, 0), // rank 0: a single element
    };
    let rows_per_task = (CHUNK / last.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * last)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (r, row) in chunk.chunks_mut(last).enumerate() {
                let row_index = task * rows_per_task + r;
                let (oa, ob) = (
                    row_offset(dims, &ta, row_index),
                    row_offset(dims, &tb, row_index),
                );
                match (inner_a, inner_b) {
                    (1, 1) => row
                        .iter_mut()
                        .zip(&a[oa..oa + last])
                        .zip(&b[ob..ob + last])
                        .for_each(|((o, &x), &y)| *o = op.apply(x, y)),
                    (1, _) => {
                        let y = b[ob];
                        row.iter_mut()
                            .zip(&a[oa..oa + last])
                            .for_each(|(o, &x)| *o = op.apply(x, y));
                    }
                    (_, 1) => {
                        let x = a[oa];
                        row.iter_mut()
                            .zip(&b[ob..ob + last])
                            .for_each(|(o, &y)| *o = op.apply(x, y));
                    }
                    _ => row.iter_mut().for_each(|o| *o = op.apply(a[oa], b[ob])),
                }
            }
        });
    Ok(out)
}

/// `f(x)` for every element, in parallel.
pub(crate) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = f(x);
            }
        });
    out
}

/// `f(x, y)` for every pair of elements of equal-length slices, in parallel.
pub(crate) fn zip_map(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK))
        .for_each(|((o, x), y)| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = f(x, y);
            }
        });
    out
}

/// `f(x)` elementwise.
pub(crate) fn unary(op: UnaryOp, x: &[f32]) -> Vec<f32> {
    map(x, |v| op.apply(v))
}

/// `grad · f'(x)` elementwise.
pub(crate) fn unary_backward(op: UnaryOp, x: &[f32], grad: &[f32]) -> Vec<f32> {
    zip_map(x, grad, |v, g| g * op.derivative(v))
}
