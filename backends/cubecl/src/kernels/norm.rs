//! Group normalisation: one cube per (sample, group) for the statistics (two-pass mean and
//! variance with tree sums), elementwise kernels for the affine map and `dx`, one cube per
//! channel for `dγ`, `dβ`.

use cubecl::prelude::*;

use super::reduce::tree_sum;

/// `mean[s]`, `rstd[s] = 1/√(var + ε)` of the `len` contiguous elements of group `s`
/// (cube `s`).
#[cube(launch)]
pub fn group_stats<F: Float>(
    x: &Array<F>,
    mean: &mut Array<f32>,
    rstd: &mut Array<f32>,
    len: u32,
    eps: f32,
    #[comptime] block: u32,
) {
    let mut shared = SharedMemory::<f32>::new(block as usize);
    let group = CUBE_POS;
    let l = len as usize;
    let base = group * l;
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < l {
        acc += f32::cast_from(x[base + i]);
        i += block as usize;
    }
    shared[UNIT_POS as usize] = acc;
    sync_cube();
    tree_sum(&mut shared);
    let mu = shared[0] / f32::cast_from(len);
    sync_cube();
    let mut sq = 0.0f32;
    let mut j = UNIT_POS as usize;
    while j < l {
        let d = f32::cast_from(x[base + j]) - mu;
        sq += d * d;
        j += block as usize;
    }
    shared[UNIT_POS as usize] = sq;
    sync_cube();
    tree_sum(&mut shared);
    if UNIT_POS == 0 {
        mean[group] = mu;
        rstd[group] = 1.0 / f32::sqrt(shared[0] / f32::cast_from(len) + eps);
    }
}

/// `y = (x − μ_g)·rstd_g·γ_c + β_c`; `x` is `[n, c, spatial]`, `cpg` channels per group.
#[cube(launch)]
pub fn group_norm_apply<F: Float>(
    x: &Array<F>,
    gamma: &Array<F>,
    beta: &Array<F>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    out: &mut Array<F>,
    channels: u32,
    spatial: u32,
    cpg: u32,
) {
    if ABSOLUTE_POS < out.len() {
        let c = (ABSOLUTE_POS / spatial as usize) % channels as usize;
        let b = ABSOLUTE_POS / (spatial as usize * channels as usize);
        let s = b * (channels / cpg) as usize + c / cpg as usize;
        let xhat = (f32::cast_from(x[ABSOLUTE_POS]) - mean[s]) * rstd[s];
        out[ABSOLUTE_POS] = F::cast_from(xhat * f32::cast_from(gamma[c]) + f32::cast_from(beta[c]));
    }
}

/// Per group `s` (cube `s`): `sums[2s] = mean(ĝ)`, `sums[2s+1] = mean(ĝ·x̂)` with `ĝ = g·γ_c`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn group_grad_sums<F: Float>(
    x: &Array<F>,
    gamma: &Array<F>,
    grad: &Array<F>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    sums: &mut Array<f32>,
    len: u32,
    spatial: u32,
    cpg: u32,
    #[comptime] block: u32,
) {
    let mut s1 = SharedMemory::<f32>::new(block as usize);
    let mut s2 = SharedMemory::<f32>::new(block as usize);
    let group = CUBE_POS;
    let l = len as usize;
    let base = group * l;
    let mu = mean[group];
    let r = rstd[group];
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < l {
        // Channel of element i: the group's first channel + i / spatial.
        let c = (group * cpg as usize) % gamma.len() + i / spatial as usize;
        let gh = f32::cast_from(grad[base + i]) * f32::cast_from(gamma[c]);
        let xhat = (f32::cast_from(x[base + i]) - mu) * r;
        a1 += gh;
        a2 += gh * xhat;
        i += block as usize;
    }
    s1[UNIT_POS as usize] = a1;
    s2[UNIT_POS as usize] = a2;
    sync_cube();
    tree_sum(&mut s1);
    tree_sum(&mut s2);
    if UNIT_POS == 0 {
        sums[2 * group] = s1[0] / f32::cast_from(len);
        sums[2 * group + 1] = s2[0] / f32::cast_from(len);
    }
}

/// `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn group_norm_dx<F: Float>(
    x: &Array<F>,
    gamma: &Array<F>,
    grad: &Array<F>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    sums: &Array<f32>,
    dx: &mut Array<F>,
    channels: u32,
    spatial: u32,
    cpg: u32,
) {
    if ABSOLUTE_POS < dx.len() {
        let c = (ABSOLUTE_POS / spatial as usize) % channels as usize;
        let b = ABSOLUTE_POS / (spatial as usize * channels as usize);
        let s = b * (channels / cpg) as usize + c / cpg as usize;
        let xhat = (f32::cast_from(x[ABSOLUTE_POS]) - mean[s]) * rstd[s];
        let gh = f32::cast_from(grad[ABSOLUTE_POS]) * f32::cast_from(gamma[c]);
        dx[ABSOLUTE_POS] = F::cast_from(rstd[s] * (gh - sums[2 * s] - xhat * sums[2 * s + 1]));
    }
}

/// Cube `c`: `dγ_c = Σ g·x̂`, `dβ_c = Σ g` over samples and positions.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn group_norm_dparams<F: Float>(
    x: &Array<F>,
    grad: &Array<F>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    dgamma: &mut Array<F>,
    dbeta: &mut Array<F>,
    batch: u32,
    spatial: u32,
    cpg: u32,
    #[comptime] block: u32,
) {
    let mut s1 = SharedMemory::<f32>::new(block as usize);
    let mut s2 = SharedMemory::<f32>::new(block as usize);
    let c = CUBE_POS;
    let channels = dgamma.len();
    let sp = spatial as usize;
    let total = batch as usize * sp;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < total {
        let b = i / sp;
        let idx = (b * channels + c) * sp + i % sp;
        let s = b * (channels / cpg as usize) + c / cpg as usize;
        let gv = f32::cast_from(grad[idx]);
        a1 += gv * (f32::cast_from(x[idx]) - mean[s]) * rstd[s];
        a2 += gv;
        i += block as usize;
    }
    s1[UNIT_POS as usize] = a1;
    s2[UNIT_POS as usize] = a2;
    sync_cube();
    tree_sum(&mut s1);
    tree_sum(&mut s2);
    if UNIT_POS == 0 {
        dgamma[c] = F::cast_from(s1[0]);
        dbeta[c] = F::cast_from(s2[0]);
    }
}
