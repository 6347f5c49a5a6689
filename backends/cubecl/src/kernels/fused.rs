//! The fused training kernels: LISA's per-sample sums and gradient, MSE, and AdamW.

use cubecl::prelude::*;

use super::reduce::tree_sum;

/// Cube `b` (one per sample, `per` elements each), with `τ = scale_b·(y − prior)`:
/// `sums[4b..4b+4] = (Σ (d − τ)², Σ d·τ, Σ d², Σ τ²)`.
#[cube(launch)]
pub fn lisa_sums<F: Float>(
    d: &Array<F>,
    y: &Array<F>,
    prior: &Array<F>,
    scale: &Array<f32>,
    sums: &mut Array<f32>,
    per: u32,
    #[comptime] block: u32,
) {
    let mut s0 = SharedMemory::<f32>::new(block as usize);
    let mut s1 = SharedMemory::<f32>::new(block as usize);
    let mut s2 = SharedMemory::<f32>::new(block as usize);
    let mut s3 = SharedMemory::<f32>::new(block as usize);
    let b = CUBE_POS;
    let p = per as usize;
    let sc = scale[b];
    let mut a0 = 0.0f32;
    let mut a1 = 0.0f32;
    let mut a2 = 0.0f32;
    let mut a3 = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < p {
        let k = b * p + i;
        let dv = f32::cast_from(d[k]);
        let tv = sc * (f32::cast_from(y[k]) - f32::cast_from(prior[k]));
        let diff = dv - tv;
        a0 += diff * diff;
        a1 += dv * tv;
        a2 += dv * dv;
        a3 += tv * tv;
        i += block as usize;
    }
    let u = UNIT_POS as usize;
    s0[u] = a0;
    s1[u] = a1;
    s2[u] = a2;
    s3[u] = a3;
    sync_cube();
    tree_sum(&mut s0);
    tree_sum(&mut s1);
    tree_sum(&mut s2);
    tree_sum(&mut s3);
    if UNIT_POS == 0 {
        sums[4 * b] = s0[0];
        sums[4 * b + 1] = s1[0];
        sums[4 * b + 2] = s2[0];
        sums[4 * b + 3] = s3[0];
    }
}

/// `grad[k] = α_b·d[k] + β_b·τ[k]` with `coef[2b] = α_b`, `coef[2b+1] = β_b`: both LISA
/// distances' gradients have this form.
#[cube(launch)]
pub fn lisa_grad<F: Float>(
    d: &Array<F>,
    y: &Array<F>,
    prior: &Array<F>,
    scale: &Array<f32>,
    coef: &Array<f32>,
    grad: &mut Array<F>,
    per: u32,
) {
    if ABSOLUTE_POS < grad.len() {
        let b = ABSOLUTE_POS / per as usize;
        let tv = scale[b] * (f32::cast_from(y[ABSOLUTE_POS]) - f32::cast_from(prior[ABSOLUTE_POS]));
        grad[ABSOLUTE_POS] = F::cast_from(coef[2 * b] * f32::cast_from(d[ABSOLUTE_POS]) + coef[2 * b + 1] * tv);
    }
}

/// One AdamW step (see [`lisa_core::backend::AdamWParams`]), out of place: `p2, m2, v2` are
/// new buffers, so other handles to the old tensors keep their values. `c1`, `c2` are the
/// bias corrections.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn adamw<F: Float, N: Size>(
    p: &Array<Vector<F, N>>,
    m: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    p2: &mut Array<Vector<F, N>>,
    m2: &mut Array<Vector<F, N>>,
    v2: &mut Array<Vector<F, N>>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    c1: f32,
    c2: f32,
) {
    let i = ABSOLUTE_POS;
    if i < p2.len() {
        let gv = Vector::<f32, N>::cast_from(g[i]);
        let mv = Vector::new(beta1) * Vector::<f32, N>::cast_from(m[i]) + Vector::new(1.0 - beta1) * gv;
        let vv = Vector::new(beta2) * Vector::<f32, N>::cast_from(v[i]) + Vector::new(1.0 - beta2) * gv * gv;
        let decayed = Vector::<f32, N>::cast_from(p[i]) * Vector::new(1.0 - lr * weight_decay);
        let step = (mv / Vector::new(c1)) / (Vector::sqrt(vv / Vector::new(c2)) + Vector::new(eps));
        p2[i] = Vector::cast_from(decayed - Vector::new(lr) * step);
        m2[i] = Vector::cast_from(mv);
        v2[i] = Vector::cast_from(vv);
    }
}
