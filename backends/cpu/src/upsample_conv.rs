//! Nearest ×2 upsampling + 3×3 "same" convolution on the low-resolution input
//! ([`lisa_core::backend::UpsampleConvOps`]).
//!
//! Output pixel `(2i + a, 2j + b)` of `conv3x3(upsample2(x))` reads upsampled rows
//! `2i + a − 1 ..= 2i + a + 1`, i.e. input rows `i − 1, i, i` (phase `a = 0`) or `i, i, i + 1`
//! (`a = 1`), and the same for columns. So each phase `(a, b)` is a 2×2 convolution of `x`
//! whose taps are sums of the 3×3 taps:
//!
//! ```text
//! phase a = 0: kernel rows [w₀, w₁ + w₂]     phase a = 1: kernel rows [w₀ + w₁, w₂]
//! ```
//!
//! All four phases run as one convolution `x [n, c_in, h, w] ⋆ w4 [4·c_out, c_in, 2, 2]` with
//! padding 1, giving `y4 [n, 4·c_out, h + 1, w + 1]`, then
//! `y[n, o, 2i + a, 2j + b] = y4[n, (2a + b)·c_out + o, i + a, j + b]` (one halo row and column
//! per phase goes unused). That is 16 multiply-adds per input channel and 2×2 output block
//! instead of 36, no upsampled copy of `x`, and for the backward pass no upsampled `x` or
//! `∂L/∂x` at the high resolution: both backwards are the 2×2 convolution's, on the
//! interleaving's adjoint `dy4`, with the weight gradient mapped back by the kernel sums'
//! adjoint.

use std::mem::MaybeUninit;

use lisa_core::backend::geometry::Conv2dGeometry;
use lisa_core::backend::{Conv2dParams, Shape};
use lisa_core::{Error, Result};
use rayon::prelude::*;

use crate::conv;
use crate::uninit::written_once;

/// `FEEDS[a][u][p]`: kernel row `p` of the 3×3 kernel contributes to row `u` of phase `a`'s
/// 2×2 kernel (the same table serves columns).
const FEEDS: [[[bool; 3]; 2]; 2] =
    [[[true, false, false], [false, true, true]], [[true, true, false], [false, false, true]]];

/// The 2×2 convolution that computes all four phases, for `x_shape [n, c_in, h, w]`.
pub(crate) fn phase_geometry(op: &'static str, x_shape: &Shape, c_out: usize) -> Result<Conv2dGeometry> {
    x_shape.expect_rank(op, 4)?;
    let (c_in, phases) = (x_shape.dims()[1], c_out.checked_mul(4).ok_or(Error::SizeOverflow { op })?);
    Conv2dGeometry::new(
        op,
        x_shape,
        &Shape::new([phases, c_in, 2, 2]),
        Conv2dParams { stride: [1, 1], padding: [1, 1] },
    )
}

/// `w [c_out, c_in, 3, 3] → w4 [4·c_out, c_in, 2, 2]`, phase `(a, b)` at channel block `2a + b`.
pub(crate) fn phase_kernels(w: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut w4 = vec![0.0f32; 16 * c_out * c_in];
    for (phase, block) in w4.chunks_mut(4 * c_out * c_in).enumerate() {
        let (a, b) = (phase / 2, phase % 2);
        for (kernel, w4_k) in w.chunks(9).zip(block.chunks_mut(4)) {
            for (uv, tap) in w4_k.iter_mut().enumerate() {
                let (u, v) = (uv / 2, uv % 2);
                let mut s = 0.0f32;
                for p in (0..3).filter(|&p| FEEDS[a][u][p]) {
                    for q in (0..3).filter(|&q| FEEDS[b][v][q]) {
                        s += kernel[p * 3 + q];
                    }
                }
                *tap = s;
            }
        }
    }
    w4
}

/// The adjoint of [`phase_kernels`]: `dw4 [4·c_out, c_in, 2, 2] → dw [c_out, c_in, 3, 3]`.
pub(crate) fn phase_kernels_adjoint(dw4: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut dw = vec![0.0f32; 9 * c_out * c_in];
    for (phase, block) in dw4.chunks(4 * c_out * c_in).enumerate() {
        let (a, b) = (phase / 2, phase % 2);
        for (dw_k, dw4_k) in dw.chunks_mut(9).zip(block.chunks(4)) {
            for (uv, &g) in dw4_k.iter().enumerate() {
                let (u, v) = (uv / 2, uv % 2);
                for p in (0..3).filter(|&p| FEEDS[a][u][p]) {
                    for q in (0..3).filter(|&q| FEEDS[b][v][q]) {
                        dw_k[p * 3 + q] += g;
                    }
                }
            }
        }
    }
    dw
}

/// `y4 [n, 4·c_out, h + 1, w + 1] → y [n, c_out, 2h, 2w]` (+ bias), see the module docs.
pub(crate) fn interleave(y4: &[f32], batch: usize, c_out: usize, h: usize, w: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let (plane4, ow) = ((h + 1) * (w + 1), 2 * w);
    let write = |y: &mut [MaybeUninit<f32>]| {
        y.par_chunks_mut(4 * h * w).enumerate().for_each(|(plane, out)| {
            let (n, o) = (plane / c_out, plane % c_out);
            let bv = bias.map_or(0.0, |b| b[o]);
            for a in 0..2 {
                for b in 0..2 {
                    let src = &y4[(n * 4 * c_out + (2 * a + b) * c_out + o) * plane4..][..plane4];
                    for i in 0..h {
                        let row = &src[(i + a) * (w + 1) + b..][..w];
                        let dst = &mut out[(2 * i + a) * ow..][..ow];
                        for (j, &v) in row.iter().enumerate() {
                            dst[2 * j + b].write(v + bv);
                        }
                    }
                }
            }
        })
    };
    // SAFETY: in each output plane, phase (a, b), row i and column j write element
    // (2i + a, 2j + b): over a, b ∈ {0, 1}, i < h, j < w that is every element of the plane.
    unsafe { written_once(batch * c_out * 4 * h * w, write) }.0
}

/// The adjoint of [`interleave`] (without the bias): `dy [n, c_out, 2h, 2w] →
/// dy4 [n, 4·c_out, h + 1, w + 1]`, zero in each phase's unused halo row and column.
pub(crate) fn interleave_adjoint(dy: &[f32], batch: usize, c_out: usize, h: usize, w: usize) -> Vec<f32> {
    let (plane4, ow) = ((h + 1) * (w + 1), 2 * w);
    let mut dy4 = vec![0.0f32; batch * 4 * c_out * plane4];
    dy4.par_chunks_mut(plane4).enumerate().for_each(|(plane, dst)| {
        let (n, phase, o) = (plane / (4 * c_out), plane % (4 * c_out) / c_out, plane % c_out);
        let (a, b) = (phase / 2, phase % 2);
        let src = &dy[(n * c_out + o) * 4 * h * w..][..4 * h * w];
        for i in 0..h {
            let row = &src[(2 * i + a) * ow..][..ow];
            let out = &mut dst[(i + a) * (w + 1) + b..][..w];
            for (j, v) in out.iter_mut().enumerate() {
                *v = row[2 * j + b];
            }
        }
    });
    dy4
}

/// `y = conv3x3(upsample2(x)) + b`: `x [n, c_in, h, w]`, `w [c_out, c_in, 3, 3]` → `[n, c_out, 2h, 2w]`.
pub(crate) fn forward(g4: &Conv2dGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let c_out = g4.c_out / 4;
    let w4 = phase_kernels(w, c_out, g4.c_in);
    let y4 = conv::conv2d(g4, x, &w4, None); // [n, 4·c_out, h + 1, w + 1]
    interleave(&y4, g4.batch, c_out, g4.h, g4.w, bias)
}

/// `∂L/∂x [n, c_in, h, w]` from `∂L/∂y [n, c_out, 2h, 2w]`.
pub(crate) fn backward_data(g4: &Conv2dGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let c_out = g4.c_out / 4;
    let dy4 = interleave_adjoint(dy, g4.batch, c_out, g4.h, g4.w);
    conv::conv2d_backward_data(g4, &dy4, &phase_kernels(w, c_out, g4.c_in))
}

/// `∂L/∂w [c_out, c_in, 3, 3]` from `x` and `∂L/∂y`.
pub(crate) fn backward_weight(g4: &Conv2dGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let c_out = g4.c_out / 4;
    let dy4 = interleave_adjoint(dy, g4.batch, c_out, g4.h, g4.w);
    let dw4 = conv::conv2d_backward_weight(g4, x, &dy4);
    phase_kernels_adjoint(&dw4, c_out, g4.c_in)
}
