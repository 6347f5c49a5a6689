use alloc::vec;
use alloc::vec::Vec;

use super::expect_len;
use crate::Result;
use crate::backend::Shape;
use crate::backend::geometry::{
    concat_channels_shape, slice_channels_shape, upsample_backward_input_shape, upsample_output_shape,
};

/// Nearest upsampling of `x [n, c, h, w]` by `factor`; returns the output and its shape.
pub fn upsample_nearest(x: &[f32], x_shape: &Shape, factor: usize) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "upsample_nearest";
    expect_len(OP, x, x_shape)?;
    let out_shape = upsample_output_shape(OP, x_shape, factor)?;
    let (h, w) = (x_shape.dims()[2], x_shape.dims()[3]);
    let (oh, ow) = (h * factor, w * factor);
    let mut out = vec![0.0f32; out_shape.num_elements()?];
    for (plane, src) in x.chunks_exact(h * w).enumerate() {
        for i in 0..oh {
            for j in 0..ow {
                out[plane * oh * ow + i * ow + j] = src[(i / factor) * w + j / factor];
            }
        }
    }
    Ok((out, out_shape))
}

/// Backward of nearest upsampling: sums each `factor × factor` block of `grad [n, c, f·h, f·w]`.
pub fn upsample_nearest_backward(grad: &[f32], grad_shape: &Shape, factor: usize) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "upsample_nearest_backward";
    expect_len(OP, grad, grad_shape)?;
    let out_shape = upsample_backward_input_shape(OP, grad_shape, factor)?;
    let (oh, ow) = (grad_shape.dims()[2], grad_shape.dims()[3]);
    let (h, w) = (out_shape.dims()[2], out_shape.dims()[3]);
    let mut acc = vec![0.0f64; out_shape.num_elements()?];
    for (plane, src) in grad.chunks_exact(oh * ow).enumerate() {
        for i in 0..oh {
            for j in 0..ow {
                acc[plane * h * w + (i / factor) * w + j / factor] += src[i * ow + j] as f64;
            }
        }
    }
    Ok((acc.into_iter().map(|v| v as f32).collect(), out_shape))
}

/// Concatenates `[n, c_k, ...]` parts along dim 1; returns the output and its shape.
pub fn concat_channels(parts: &[(&[f32], &Shape)]) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "concat_channels";
    let shapes: Vec<&Shape> = parts.iter().map(|(_, s)| *s).collect();
    let out_shape = concat_channels_shape(OP, &shapes)?;
    for (data, shape) in parts {
        expect_len(OP, data, shape)?;
    }
    let batch = out_shape.dims()[0];
    let mut out = Vec::with_capacity(out_shape.num_elements()?);
    for n in 0..batch {
        for (data, _) in parts {
            let per = data.len() / batch.max(1);
            out.extend_from_slice(&data[n * per..(n + 1) * per]);
        }
    }
    Ok((out, out_shape))
}

/// Channels `start .. start + len` of `x [n, c, ...]`; returns the output and its shape.
pub fn slice_channels(x: &[f32], x_shape: &Shape, start: usize, len: usize) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "slice_channels";
    expect_len(OP, x, x_shape)?;
    let out_shape = slice_channels_shape(OP, x_shape, start, len)?;
    let (n, c) = (x_shape.dims()[0], x_shape.dims()[1]);
    let inner = Shape::new(&x_shape.dims()[2..]).num_elements()?;
    let mut out = Vec::with_capacity(out_shape.num_elements()?);
    for b in 0..n {
        let base = (b * c + start) * inner;
        out.extend_from_slice(&x[base..base + len * inner]);
    }
    Ok((out, out_shape))
}

/// `x` permuted by `axes` (row-major copy); returns the output and its shape.
pub fn permute(x: &[f32], x_shape: &Shape, axes: &[usize]) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "permute";
    expect_len(OP, x, x_shape)?;
    let out_shape = crate::backend::geometry::permute_shape(OP, x_shape, axes)?;
    let (dims, strides) = crate::backend::geometry::permute_strides(x_shape, axes);
    let mut out = Vec::with_capacity(x.len());
    let mut idx = vec![0usize; dims.len()];
    let mut src = 0usize;
    for _ in 0..x.len() {
        out.push(x[src]);
        // Next output multi-index, keeping the source offset in step.
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            src += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            src -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    Ok((out, out_shape))
}
