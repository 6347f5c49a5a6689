//! 2-D convolution as im2col + GEMM, with its two backward kernels.
//!
//! Per image `n` (`K = c_in·kh·kw`, `P = oh·ow`):
//! - forward:         `y[n] (c_out × P) = W (c_out × K) · cols[n] (K × P)`
//! - backward data:   `dcols (K × P) = Wᵀ · dy[n]`, then col2im scatters `dcols` into `dx[n]`
//! - backward weight: `dW (c_out × K) = Σ_n dy[n] · cols[n]ᵀ`
//!
//! A 1×1 kernel with stride 1 and no padding needs no im2col: `cols[n]` is `x[n]` itself.
//! Images run in parallel (single-threaded GEMMs) when there are at least as many images as
//! threads; otherwise images run in turn with multi-threaded GEMMs. The weight gradient sums
//! fixed groups of images in parallel and adds the group partials in order, so the result
//! does not depend on the thread count.

use lisa_core::backend::geometry::Conv2dGeometry;
use rayon::prelude::*;

use crate::gemm::{MatRef, gemm_into};

/// Number of image groups the weight gradient is split into (fixed: determinism).
const WEIGHT_GRAD_GROUPS: usize = 8;

fn is_pointwise(g: &Conv2dGeometry) -> bool {
    g.kh == 1 && g.kw == 1 && g.params.stride == [1, 1] && g.params.padding == [0, 0]
}

/// Lowers one image `x [c_in, h, w]` to `cols [K, P]` (zeros where the kernel reads padding).
fn im2col(g: &Conv2dGeometry, x: &[f32], cols: &mut [f32]) {
    let [sh, sw] = g.params.stride;
    let [ph, pw] = g.params.padding;
    let p = g.oh * g.ow;
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for u in 0..g.kh {
            for v in 0..g.kw {
                let row = &mut cols[((c * g.kh + u) * g.kw + v) * p..][..p];
                for i in 0..g.oh {
                    let out_row = &mut row[i * g.ow..(i + 1) * g.ow];
                    match (sh * i + u).checked_sub(ph).filter(|&r| r < g.h) {
                        None => out_row.fill(0.0),
                        Some(r) => {
                            let src = &plane[r * g.w..(r + 1) * g.w];
                            for (j, o) in out_row.iter_mut().enumerate() {
                                *o = (sw * j + v)
                                    .checked_sub(pw)
                                    .filter(|&q| q < g.w)
                                    .map_or(0.0, |q| src[q]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Scatter-adds `cols [K, P]` back into one image `dx [c_in, h, w]` (the adjoint of im2col).
fn col2im(g: &Conv2dGeometry, cols: &[f32], dx: &mut [f32]) {
    let [sh, sw] = g.params.stride;
    let [ph, pw] = g.params.padding;
    let p = g.oh * g.ow;
    dx.fill(0.0);
    for c in 0..g.c_in {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for u in 0..g.kh {
            for v in 0..g.kw {
                let row = &cols[((c * g.kh + u) * g.kw + v) * p..][..p];
                for i in 0..g.oh {
                    let Some(r) = (sh * i + u).checked_sub(ph).filter(|&r| r < g.h) else {
                        continue;
                    };
                    let dst = &mut plane[r * g.w..(r + 1) * g.w];
                    for (j, &val) in row[i * g.ow..(i + 1) * g.ow].iter().enumerate() {
                        if let Some(q) = (sw * j + v).checked_sub(pw).filter(|&q| q < g.w) {
                            dst[q] += val;
                        }
                    }
                }
            }
        }
    }
}

fn parallel_over_images(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

/// Runs `per_image(n, out_n, scratch)` for every image, in parallel over images or in turn.
fn for_each_image(
    batch: usize,
    out: &mut [f32],
    out_per_image: usize,
    scratch_len: usize,
    per_image: impl Fn(usize, &mut [f32], &mut Vec<f32>, bool) + Sync,
) {
    if parallel_over_images(batch) {
        out.par_chunks_mut(out_per_image).enumerate().for_each_init(
            || vec![0.0f32; scratch_len],
            |scratch, (n, o)| per_image(n, o, scratch, false),
        );
    } else {
        let mut scratch = vec![0.0f32; scratch_len];
        for (n, o) in out.chunks_mut(out_per_image).enumerate() {
            per_image(n, o, &mut scratch, true);
        }
    }
}

/// Forward: `y = W ⋆ x + b`, `x [n, c_in, h, w]`, `w [c_out, c_in, kh, kw]`.
pub(crate) fn conv2d(g: &Conv2dGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let mut y = vec![0.0f32; g.batch * g.c_out * p];
    let scratch = if pointwise { 0 } else { k * p };
    for_each_image(
        g.batch,
        &mut y,
        g.c_out * p,
        scratch,
        |n, y_n, cols, par| {
            let x_n = &x[n * in_img..(n + 1) * in_img];
            let cols: &[f32] = if pointwise {
                x_n
            } else {
                im2col(g, x_n, cols);
                cols
            };
            gemm_into(
                y_n,
                false,
                MatRef::row_major(w, g.c_out, k),
                MatRef::row_major(cols, k, p),
                par,
            );
            if let Some(b) = bias {
                for (row, &bv) in y_n.chunks_mut(p).zip(b) {
                    row.iter_mut().for_each(|v| *v += bv);
                }
            }
        },
    );
    y
}

/// Backward data: `dx = col2im(Wᵀ · dy)`.
pub(crate) fn conv2d_backward_data(g: &Conv2dGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let mut dx = vec![0.0f32; g.batch * in_img];
    let scratch = if pointwise { 0 } else { k * p };
    for_each_image(g.batch, &mut dx, in_img, scratch, |n, dx_n, dcols, par| {
        let dy_n = MatRef::row_major(&dy[n * g.c_out * p..(n + 1) * g.c_out * p], g.c_out, p);
        let w_t = MatRef::transposed(w, k, g.c_out);
        if pointwise {
            gemm_into(dx_n, false, w_t, dy_n, par);
        } else {
            gemm_into(dcols, false, w_t, dy_n, par);
            col2im(g, dcols, dx_n);
        }
    });
    dx
}

/// Backward weight: `dW = Σ_n dy[n] · cols[n]ᵀ` over fixed groups of images.
pub(crate) fn conv2d_backward_weight(g: &Conv2dGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let groups = WEIGHT_GRAD_GROUPS.min(g.batch);
    let per_group = g.batch.div_ceil(groups);
    // Too few groups to occupy the threads: let each GEMM use them instead.
    let par_gemm = groups < rayon::current_num_threads();
    let partials: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|grp| {
            let mut dw = vec![0.0f32; g.c_out * k];
            let mut cols = vec![0.0f32; if pointwise { 0 } else { k * p }];
            for (i, n) in (grp * per_group..((grp + 1) * per_group).min(g.batch)).enumerate() {
                let x_n = &x[n * in_img..(n + 1) * in_img];
                let cols: &[f32] = if pointwise {
                    x_n
                } else {
                    im2col(g, x_n, &mut cols);
                    &cols
                };
                let dy_n =
                    MatRef::row_major(&dy[n * g.c_out * p..(n + 1) * g.c_out * p], g.c_out, p);
                gemm_into(
                    &mut dw,
                    i > 0,
                    dy_n,
                    MatRef::transposed(cols, p, k),
                    par_gemm,
                );
            }
            dw
        })
        .collect();
    let mut total = vec![0.0f32; g.c_out * k];
    for part in &partials {
        total.iter_mut().zip(part).for_each(|(t, &v)| *t += v);
    }
    total
}
