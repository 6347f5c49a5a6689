//! Sums and softmax.

use cubecl::prelude::*;
use lisa_core::backend::{ReduceOps, Shape, TensorOps};
use lisa_core::{Error, Result};

use super::{CubeBackend, T, alloc, arg, check_dtype, table, u32_of};
use crate::kernels::{BLOCK, reduce as k};
use crate::launch::{grid_1d, with_float};

/// Stage-1 cubes of a full sum: enough to fill a GPU, few enough to finish in one cube.
const SUM_CUBES: usize = 256;

/// `Σ t` (or `Σ t²`) as a one-element tensor of `t`'s dtype: a fixed two-stage tree.
fn full_sum<R: Runtime>(t: &T<R>, square: bool) -> Result<T<R>> {
    check_dtype("sum", &t.device, t.dtype)?;
    if t.is_empty() {
        return CubeBackend::<R>::full(&Shape::scalar(), 0.0, t.dtype, &t.device);
    }
    let out = alloc(&t.device, Shape::scalar(), t.dtype)?;
    let client = &t.device.client;
    let cubes = t.len().div_ceil(BLOCK as usize).clamp(1, SUM_CUBES);
    let partial = client.empty(cubes * 4);
    // SAFETY: `partial` holds `cubes` f32 values.
    let partial_arg = || unsafe { ArrayArg::<R>::from_raw_parts(partial.clone(), cubes) };
    with_float!(t.dtype, F => {
        k::partial_sums::launch::<F, R>(
            client, CubeCount::Static(cubes as u32, 1, 1), CubeDim::new_1d(BLOCK), arg(t), partial_arg(), BLOCK, square
        );
        k::finish_sum::launch::<F, R>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(BLOCK), partial_arg(), arg(&out), BLOCK);
    });
    Ok(out)
}

fn last_dim(op: &'static str, shape: &Shape) -> Result<usize> {
    shape.num_elements()?;
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(Error::Empty { op }),
    }
}

impl<R: Runtime> ReduceOps for CubeBackend<R> {
    fn sum(t: &T<R>) -> Result<T<R>> {
        full_sum(t, false)
    }
    fn sum_squares(t: &T<R>) -> Result<T<R>> {
        full_sum(t, true)
    }
    fn sum_to_shape(t: &T<R>, shape: &Shape) -> Result<T<R>> {
        const OP: &str = "sum_to_shape";
        if shape.rank() > t.shape.rank() || Shape::broadcast(OP, shape, &t.shape)? != t.shape {
            return Err(Error::ShapeMismatch { op: OP, expected: t.shape.clone(), got: shape.clone() });
        }
        check_dtype(OP, &t.device, t.dtype)?;
        let out = alloc(&t.device, shape.clone(), t.dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let rank = t.shape.rank();
        let pad = rank - shape.rank();
        let out_dims: Vec<usize> = (0..rank).map(|d| if d < pad { 1 } else { shape.dims()[d - pad] }).collect();
        let reduced_dims: Vec<usize> =
            (0..rank).map(|d| if out_dims[d] == 1 { t.shape.dims()[d] } else { 1 }).collect();
        let reduced: usize = reduced_dims.iter().product();
        let mut meta = out_dims;
        meta.extend(reduced_dims);
        meta.extend(t.shape.strides());
        let meta = table(&t.device, &meta)?;
        let (count, dim) = grid_1d(out.len());
        with_float!(t.dtype, F => k::sum_to_shape::launch::<F, R>(
            &t.device.client, count, dim, arg(t), arg(&out), meta, rank as u32, u32_of(OP, reduced)?
        ));
        Ok(out)
    }
    fn softmax_last(t: &T<R>) -> Result<T<R>> {
        let d = last_dim("softmax_last", &t.shape)?;
        check_dtype("softmax_last", &t.device, t.dtype)?;
        let out = alloc(&t.device, t.shape.clone(), t.dtype)?;
        let rows = t.len() / d;
        if rows > 0 {
            let (count, dim) = grid_1d(rows);
            with_float!(t.dtype, F => k::softmax_last::launch::<F, R>(
                &t.device.client, count, dim, arg(t), arg(&out), u32_of("softmax_last", d)?, u32_of("softmax_last", rows)?
            ));
        }
        Ok(out)
    }
    fn softmax_last_backward(y: &T<R>, grad: &T<R>) -> Result<T<R>> {
        const OP: &str = "softmax_last_backward";
        let dtype = Self::expect_same_dtype(OP, y, grad)?;
        y.shape.expect_eq(OP, &grad.shape)?;
        let d = last_dim(OP, &y.shape)?;
        check_dtype(OP, &y.device, dtype)?;
        let out = alloc(&y.device, y.shape.clone(), dtype)?;
        let rows = y.len() / d;
        if rows > 0 {
            let (count, dim) = grid_1d(rows);
            with_float!(dtype, F => k::softmax_last_backward::launch::<F, R>(
                &y.device.client, count, dim, arg(y), arg(grad), arg(&out), u32_of(OP, d)?, u32_of(OP, rows)?
            ));
        }
        Ok(out)
    }
}
