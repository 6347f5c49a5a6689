//! Group norm forward/backward, parallel over (sample, group) slices.
//!
//! Each (sample, group) slice of `x [n, c, *spatial]` is contiguous: `(c/g)·spatial` values.

use std::mem::MaybeUninit;

use lisa_core::backend::geometry::GroupNormGeometry;
use rayon::prelude::*;

use crate::elementwise::{silu_backward_in_place, silu_in_place};
use crate::simd::vectorised;
use crate::sums::{sum_map, sum_zip};
use crate::uninit::{assume_written, written_once};

/// Forward: returns `(y, mean [n·g], rstd [n·g])`; statistics accumulate in f64, two passes.
pub(crate) fn group_norm(
    g: &GroupNormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    normalise_groups(g, x, gamma, beta, eps, |_| {})
}

/// `a = silu(group_norm(x))`: the activation applied as each value is normalised (one pass
/// over `x`, no normalised copy): returns `(a, mean, rstd)`.
pub(crate) fn group_norm_silu(
    g: &GroupNormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    normalise_groups(g, x, gamma, beta, eps, silu_in_place)
}

/// `y = (x − μ)·rstd·γ + β` per (sample, group), each group's slice then passed to `then`
/// while in cache, with the statistics.
fn normalise_groups(
    g: &GroupNormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    then: impl Fn(&mut [f32]) + Sync,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = g.group_len();
    let write = |y: &mut [MaybeUninit<f32>]| -> Vec<(f32, f32)> {
        y.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .map(|(k, (y, x))| {
                vectorised(|| {
                    let mean = sum_map(x, |v| v as f64) / len as f64;
                    let var = sum_map(x, |v| (v as f64 - mean) * (v as f64 - mean)) / len as f64;
                    let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
                    let mean = mean as f32;
                    then(affine_group(g, k, (mean, rstd), (gamma, beta), x, y));
                    (mean, rstd)
                })
            })
            .collect()
    };
    // SAFETY: `affine_group` writes every element of each slice; the slices cover `y`.
    let (y, stats) = unsafe { written_once(x.len(), write) };
    let (mean, rstd) = stats.into_iter().unzip();
    (y, mean, rstd)
}

/// `∂L/∂z = g·silu'(z)` with the pre-activation `z = (x − μ)·rstd·γ + β` recomputed per group
/// from the statistics (the backward of [`group_norm_silu`] up to the norm).
pub(crate) fn silu_grad_before_norm(
    g: &GroupNormGeometry,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    grad: &[f32],
) -> Vec<f32> {
    let len = g.group_len();
    // `zip` stops at the shorter input: equal lengths make every slice of `dz` written.
    assert!(x.len() == grad.len(), "silu_grad_before_norm: lengths {} and {}", x.len(), grad.len());
    let write = |dz: &mut [MaybeUninit<f32>]| {
        dz.par_chunks_mut(len).zip(x.par_chunks(len).zip(grad.par_chunks(len))).enumerate().for_each(
            |(k, (dz, (x, grad)))| {
                vectorised(|| {
                    let dz = affine_group(g, k, (mean[k], rstd[k]), (gamma, beta), x, dz);
                    silu_backward_in_place(dz, grad);
                })
            },
        )
    };
    // SAFETY: `affine_group` writes every element of each slice; the slices cover `dz`.
    unsafe { written_once(x.len(), write) }.0
}

/// `y = (x − μ)·rstd·γ_c + β_c` over the `k`-th (sample, group) slice: `x`, `y` hold its
/// `channels/groups` planes of `spatial` values. Writes every element of `y` (which may come
/// uninitialised) and returns it as initialised values.
#[inline(always)]
fn affine_group<'y>(
    g: &GroupNormGeometry,
    k: usize,
    (mean, rstd): (f32, f32),
    (gamma, beta): (&[f32], &[f32]),
    x: &[f32],
    y: &'y mut [MaybeUninit<f32>],
) -> &'y mut [f32] {
    assert_eq!(x.len(), y.len(), "affine_group: slice lengths");
    let first = (k % g.groups) * (g.channels / g.groups);
    for (c_local, (y, x)) in y.chunks_mut(g.spatial).zip(x.chunks(g.spatial)).enumerate() {
        let ch = first + c_local;
        let (scale, shift) = (rstd * gamma[ch], beta[ch] - mean * rstd * gamma[ch]);
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(x * scale + shift);
        }
    }
    // SAFETY: the planes of `y` and `x` pair up one to one (equal lengths, asserted), and
    // every element of every plane of `y` was written above.
    unsafe { assume_written(y) }
}

/// Backward: `dx = rstd·(ĝ − mean ĝ − x̂·mean(ĝx̂))`, `dγ = Σ g·x̂`, `dβ = Σ g` (per channel,
/// per-sample partials summed over samples in order).
pub(crate) fn group_norm_backward(
    g: &GroupNormGeometry,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let len = g.group_len();
    let cpg = g.channels / g.groups;
    // Per slice: the (dγ, dβ) partials of its cpg channels; `dx` written once.
    let write = |dx: &mut [MaybeUninit<f32>]| -> Vec<Vec<(f64, f64)>> {
        dx.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .zip(dy.par_chunks(len))
            .enumerate()
            .map(|(k, ((dx, x), dy))| {
                vectorised(|| {
                    let (mu, rs) = (mean[k], rstd[k]);
                    let group = k % g.groups;
                    let mut channel_sums = vec![(0.0f64, 0.0f64); cpg];
                    let (mut sum_gh, mut sum_gh_xh) = (0.0f64, 0.0f64);
                    for (c_local, (x, dy)) in x.chunks(g.spatial).zip(dy.chunks(g.spatial)).enumerate() {
                        let gm = gamma[group * cpg + c_local] as f64;
                        let (mu64, rs64) = (mu as f64, rs as f64);
                        let dg = sum_zip(x, dy, |xv, gv| gv as f64 * ((xv as f64 - mu64) * rs64));
                        let db = sum_map(dy, |gv| gv as f64);
                        sum_gh += gm * db;
                        sum_gh_xh += gm * dg;
                        channel_sums[c_local] = (dg, db);
                    }
                    let (m_gh, m_gh_xh) = ((sum_gh / len as f64) as f32, (sum_gh_xh / len as f64) as f32);
                    for (c_local, ((dx, x), dy)) in
                        dx.chunks_mut(g.spatial).zip(x.chunks(g.spatial)).zip(dy.chunks(g.spatial)).enumerate()
                    {
                        let gm = gamma[group * cpg + c_local];
                        for ((d, &xv), &gv) in dx.iter_mut().zip(x).zip(dy) {
                            let xh = (xv - mu) * rs;
                            d.write(rs * (gv * gm - m_gh - xh * m_gh_xh));
                        }
                    }
                    channel_sums
                })
            })
            .collect()
    };
    assert_eq!(x.len(), dy.len(), "group_norm_backward: lengths");
    // SAFETY: every slice of `dx` is written plane by plane (its planes pair up one to one
    // with those of `x` and `dy`, equal lengths); the slices cover `dx`.
    let (dx, partials) = unsafe { written_once(x.len(), write) };
    let (mut dgamma, mut dbeta) = (vec![0.0f64; g.channels], vec![0.0f64; g.channels]);
    for (k, sums) in partials.iter().enumerate() {
        let group = k % g.groups;
        for (c_local, &(dg, db)) in sums.iter().enumerate() {
            dgamma[group * cpg + c_local] += dg;
            dbeta[group * cpg + c_local] += db;
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (dx, f(dgamma), f(dbeta))
}
