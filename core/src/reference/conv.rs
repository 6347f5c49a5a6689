use alloc::vec;
use alloc::vec::Vec;

use super::expect_len;
use crate::backend::Shape;
use crate::backend::geometry::{Conv2dGeometry, Conv2dParams};
use crate::{Error, Result};

/// Calls `f(x_index, w_index, y_index)` for every multiply-add of the convolution that
/// touches the input (padding taps skipped).
fn for_each_tap(g: &Conv2dGeometry, mut f: impl FnMut(usize, usize, usize)) {
    let [sh, sw] = g.params.stride;
    let [ph, pw] = g.params.padding;
    for n in 0..g.batch {
        for o in 0..g.c_out {
            for i in 0..g.oh {
                for j in 0..g.ow {
                    let y = ((n * g.c_out + o) * g.oh + i) * g.ow + j;
                    for c in 0..g.c_in {
                        for u in 0..g.kh {
                            let Some(r) = (sh * i + u).checked_sub(ph).filter(|&r| r < g.h) else {
                                continue;
                            };
                            for v in 0..g.kw {
                                let Some(q) = (sw * j + v).checked_sub(pw).filter(|&q| q < g.w) else {
                                    continue;
                                };
                                let x = ((n * g.c_in + c) * g.h + r) * g.w + q;
                                let w = ((o * g.c_in + c) * g.kh + u) * g.kw + v;
                                f(x, w, y);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Convolution forward (f64 accumulation); returns the output and its shape.
pub fn conv2d(
    x: &[f32],
    x_shape: &Shape,
    w: &[f32],
    w_shape: &Shape,
    bias: Option<&[f32]>,
    params: Conv2dParams,
) -> Result<(Vec<f32>, Shape)> {
    const OP: &str = "conv2d";
    expect_len(OP, x, x_shape)?;
    expect_len(OP, w, w_shape)?;
    let g = Conv2dGeometry::new(OP, x_shape, w_shape, params)?;
    if let Some(b) = bias {
        expect_len(OP, b, &Shape::new([g.c_out]))?;
    }
    let out_shape = g.output_shape();
    let mut acc = vec![0.0f64; out_shape.num_elements()?];
    for_each_tap(&g, |xi, wi, yi| acc[yi] += x[xi] as f64 * w[wi] as f64);
    let plane = g.oh * g.ow;
    Ok((
        acc.iter()
            .enumerate()
            .map(|(i, &s)| (s + bias.map_or(0.0, |b| b[(i / plane) % g.c_out] as f64)) as f32)
            .collect(),
        out_shape,
    ))
}

/// `∂L/∂x` of the convolution for an input of `x_shape`.
pub fn conv2d_backward_data(
    grad_out: &[f32],
    grad_shape: &Shape,
    w: &[f32],
    w_shape: &Shape,
    x_shape: &Shape,
    params: Conv2dParams,
) -> Result<Vec<f32>> {
    const OP: &str = "conv2d_backward_data";
    expect_len(OP, w, w_shape)?;
    let g = Conv2dGeometry::new(OP, x_shape, w_shape, params)?;
    check_grad_shape(OP, &g, grad_out, grad_shape)?;
    let mut acc = vec![0.0f64; x_shape.num_elements()?];
    for_each_tap(&g, |xi, wi, yi| acc[xi] += grad_out[yi] as f64 * w[wi] as f64);
    Ok(acc.into_iter().map(|v| v as f32).collect())
}

/// `∂L/∂w` of the convolution for a weight of `w_shape`.
pub fn conv2d_backward_weight(
    x: &[f32],
    x_shape: &Shape,
    grad_out: &[f32],
    grad_shape: &Shape,
    w_shape: &Shape,
    params: Conv2dParams,
) -> Result<Vec<f32>> {
    const OP: &str = "conv2d_backward_weight";
    expect_len(OP, x, x_shape)?;
    let g = Conv2dGeometry::new(OP, x_shape, w_shape, params)?;
    check_grad_shape(OP, &g, grad_out, grad_shape)?;
    let mut acc = vec![0.0f64; w_shape.num_elements()?];
    for_each_tap(&g, |xi, wi, yi| acc[wi] += grad_out[yi] as f64 * x[xi] as f64);
    Ok(acc.into_iter().map(|v| v as f32).collect())
}

fn check_grad_shape(op: &'static str, g: &Conv2dGeometry, grad: &[f32], grad_shape: &Shape) -> Result<()> {
    let expected = g.output_shape();
    if *grad_shape != expected {
        return Err(Error::ShapeMismatch { op, expected, got: grad_shape.clone() });
    }
    expect_len(op, grad, grad_shape)
}
