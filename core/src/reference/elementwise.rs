use alloc::vec;
use alloc::vec::Vec;

use super::expect_len;
use crate::backend::{BinaryOp, Shape};
use crate::{Error, Result};

/// Calls `f(out_index, a_index, b_index)` over every element of `out` in row-major order.
fn for_each_broadcast(out: &Shape, sa: &[usize], sb: &[usize], mut f: impl FnMut(usize, usize, usize)) -> Result<()> {
    let n = out.num_elements()?;
    let dims = out.dims();
    let mut idx = vec![0usize; dims.len()];
    let (mut ia, mut ib) = (0usize, 0usize);
    for o in 0..n {
        f(o, ia, ib);
        // Increment the multi-index, maintaining the two source offsets.
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            ia += sa[d];
            ib += sb[d];
            if idx[d] < dims[d] {
                break;
            }
            ia -= sa[d] * dims[d];
            ib -= sb[d] * dims[d];
            idx[d] = 0;
        }
    }
    Ok(())
}

/// `op(a, b)` with numpy broadcasting; returns the output and its shape.
pub fn binary_broadcast(
    op: BinaryOp,
    a: &[f32],
    a_shape: &Shape,
    b: &[f32],
    b_shape: &Shape,
) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "binary";
    expect_len(OP, a, a_shape)?;
    expect_len(OP, b, b_shape)?;
    let out_shape = Shape::broadcast(OP, a_shape, b_shape)?;
    let (sa, sb) = (a_shape.broadcast_strides(&out_shape), b_shape.broadcast_strides(&out_shape));
    let mut out = vec![0.0f32; out_shape.num_elements()?];
    for_each_broadcast(&out_shape, &sa, &sb, |o, i, j| out[o] = op.apply(a[i], b[j]))?;
    Ok((out, out_shape))
}

/// Sums `t` (of `t_shape`) down to `target`, which must broadcast to `t_shape`.
pub fn sum_to_shape(t: &[f32], t_shape: &Shape, target: &Shape) -> Result<Vec<f32>> {
    const OP: &str = "sum_to_shape";
    expect_len(OP, t, t_shape)?;
    if target.rank() > t_shape.rank() || Shape::broadcast(OP, target, t_shape)? != *t_shape {
        return Err(Error::ShapeMismatch { op: OP, expected: t_shape.clone(), got: target.clone() });
    }
    let st = target.broadcast_strides(t_shape);
    let unit = t_shape.strides();
    let mut acc = vec![0.0f64; target.num_elements()?];
    for_each_broadcast(t_shape, &unit, &st, |_, i, j| acc[j] += t[i] as f64)?;
    Ok(acc.into_iter().map(|x| x as f32).collect())
}
