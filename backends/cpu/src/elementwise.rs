//! Elementwise kernels: broadcast binary ops, affine, unary functions and their backward.

use std::mem::MaybeUninit;

use lisa_core::Result;
use lisa_core::backend::{BinaryOp, Shape, UnaryOp};
use rayon::prelude::*;

use crate::CHUNK;

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
        return Ok(zip_map(a, b, |x, y| op.apply(x, y)));
    }
    // General path: rows of the last output dim; each side steps by 0 or 1 inside a row.
    let dims = out_shape.dims();
    let (ta, tb) = (sa.broadcast_strides(out_shape), sb.broadcast_strides(out_shape));
    let (last, inner_a, inner_b) = match dims.last() {
        Some(&l) => (l, *ta.last().unwrap_or(&0), *tb.last().unwrap_or(&0)),
        None => (1, 0, 0), // rank 0: a single element
    };
    let rows_per_task = (CHUNK / last.max(1)).max(1);
    out.par_chunks_mut(rows_per_task * last).enumerate().for_each(|(task, chunk)| {
        for (r, row) in chunk.chunks_mut(last).enumerate() {
            let row_index = task * rows_per_task + r;
            let (oa, ob) = (row_offset(dims, &ta, row_index), row_offset(dims, &tb, row_index));
            match (inner_a, inner_b) {
                (1, 1) => row
                    .iter_mut()
                    .zip(&a[oa..oa + last])
                    .zip(&b[ob..ob + last])
                    .for_each(|((o, &x), &y)| *o = op.apply(x, y)),
                (1, _) => {
                    let y = b[ob];
                    row.iter_mut().zip(&a[oa..oa + last]).for_each(|(o, &x)| *o = op.apply(x, y));
                }
                (_, 1) => {
                    let x = a[oa];
                    row.iter_mut().zip(&b[ob..ob + last]).for_each(|(o, &y)| *o = op.apply(x, y));
                }
                _ => row.iter_mut().for_each(|o| *o = op.apply(a[oa], b[ob])),
            }
        }
    });
    Ok(out)
}

/// `out[i] = f(x[i])` over one chunk (every element of `out` written), compiled for AVX2+FMA
/// when the CPU has them.
#[inline(always)]
fn map_chunk(out: &mut [MaybeUninit<f32>], x: &[f32], f: &impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::map_avx2(out, x, f) };
        return;
    }
    for (o, &x) in out.iter_mut().zip(x) {
        o.write(f(x));
    }
}

/// `v[i] ← silu(v[i])` in place (a slice already in cache), compiled for AVX2+FMA when the
/// CPU has them.
pub(crate) fn silu_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::update_avx2(v, &|z| silu(z)) };
        return;
    }
    v.iter_mut().for_each(|z| *z = silu(*z));
}

/// `v[i] ← g[i]·silu'(v[i])` in place: `v` holds the pre-activation, then its gradient.
pub(crate) fn silu_backward_in_place(v: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::update_zip_avx2(v, g, &|z, g| g * silu_derivative(z)) };
        return;
    }
    v.iter_mut().zip(g).for_each(|(z, &g)| *z = g * silu_derivative(*z));
}

/// `out[i] = f(x[i], y[i])` over one chunk (every element written), compiled for AVX2+FMA
/// when available.
#[inline(always)]
fn zip_map_chunk(out: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], f: &impl Fn(f32, f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { simd::zip_map_avx2(out, x, y, f) };
        return;
    }
    for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
        o.write(f(x, y));
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::mem::MaybeUninit;
    use std::sync::OnceLock;

    pub(super) fn has_avx2_fma() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// Runs `f` inside a function compiled with AVX2+FMA: `f` (a closure called once) is
    /// inlined here, so its loops are vectorised 8-wide.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// `v[i] ← f(v[i])`, compiled with AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn update_avx2(v: &mut [f32], f: &impl Fn(f32) -> f32) {
        for z in v.iter_mut() {
            *z = f(*z);
        }
    }

    /// `v[i] ← f(v[i], y[i])`, compiled with AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn update_zip_avx2(v: &mut [f32], y: &[f32], f: &impl Fn(f32, f32) -> f32) {
        for (z, &y) in v.iter_mut().zip(y) {
            *z = f(*z, y);
        }
    }

    /// The scalar loop, compiled with AVX2+FMA so that LLVM vectorises it 8-wide.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn map_avx2(out: &mut [MaybeUninit<f32>], x: &[f32], f: &impl Fn(f32) -> f32) {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(f(x));
        }
    }

    /// The scalar two-input loop, compiled with AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn zip_map_avx2(out: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], f: &impl Fn(f32, f32) -> f32) {
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            o.write(f(x, y));
        }
    }
}

/// Runs `f`, compiled for AVX2+FMA when the CPU has them (for loop-heavy kernel bodies).
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if simd::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { simd::with_avx2(f) };
    }
    f()
}

/// `f(x)` for every element, in parallel (into a buffer written once, not zeroed first).
pub(crate) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| map_chunk(o, x, &f));
    // SAFETY: the chunks cover all `x.len()` elements and `map_chunk` wrote each of them.
    unsafe { out.set_len(x.len()) };
    out
}

/// `f(x, y)` for every pair of elements of equal-length slices, in parallel (written once).
pub(crate) fn zip_map(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(x.len(), y.len(), "zip_map: lengths");
    let mut out = Vec::<f32>::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK))
        .for_each(|((o, x), y)| zip_map_chunk(o, x, y, &f));
    // SAFETY: the chunks cover all `x.len()` elements and `zip_map_chunk` wrote each of them.
    unsafe { out.set_len(x.len()) };
    out
}

/// `eˣ` in f32 without a libm call, so that loops over it vectorise: `eˣ = 2ⁿ·eʳ` with
/// `n = round(x·log₂e)`, `|r| ≤ ln2/2`, `eʳ` by its degree-6 Taylor polynomial (relative
/// error < 2e-7), `2ⁿ` built in the exponent bits. Inputs are clamped to [−87, 88].
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split (Cephes): LN2_HI has 9 significant bits, so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0); // propagates NaN (max/min would swallow it)
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low mantissa bits of `shifted` hold n (two's complement): no float→int conversion,
    // so the whole function vectorises.
    let two_n = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(two_n)
}

/// The logistic function `σ(x) = 1/(1 + e⁻ˣ)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `silu(x) = x·σ(x)`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`.
#[inline(always)]
pub(crate) fn silu_derivative(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `f(x)` elementwise (one monomorphised loop per function).
pub(crate) fn unary(op: UnaryOp, x: &[f32]) -> Vec<f32> {
    match op {
        UnaryOp::Silu => map(x, silu),
        UnaryOp::Exp => map(x, fast_exp),
        UnaryOp::Square => map(x, |v| v * v),
        UnaryOp::Sqrt => map(x, f32::sqrt),
        // The GELU family through lisa-core's scalar definitions (libm's erf and tanh).
        UnaryOp::Gelu | UnaryOp::GeluTanh | UnaryOp::QuickGelu => map(x, |v| op.apply(v)),
    }
}

/// `grad · f'(x)` elementwise.
pub(crate) fn unary_backward(op: UnaryOp, x: &[f32], grad: &[f32]) -> Vec<f32> {
    match op {
        UnaryOp::Silu => zip_map(x, grad, |v, g| g * silu_derivative(v)),
        UnaryOp::Exp => zip_map(x, grad, |v, g| g * fast_exp(v)),
        UnaryOp::Square => zip_map(x, grad, |v, g| 2.0 * v * g),
        UnaryOp::Sqrt => zip_map(x, grad, |v, g| 0.5 * g / v.sqrt()),
        UnaryOp::Gelu | UnaryOp::GeluTanh | UnaryOp::QuickGelu => zip_map(x, grad, |v, g| g * op.derivative(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_accurate_over_the_range() {
        let (mut worst, mut at) = (0.0f64, 0.0f32);
        for i in -86_999..88_000 {
            let x = i as f32 * 1e-3;
            let want = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - want) / want).abs();
            if rel > worst {
                (worst, at) = (rel, x);
            }
        }
        assert!(worst < 1e-6, "worst relative error {worst:e} at x = {at}");
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        assert!(fast_exp(1000.0).is_finite());
    }
}
