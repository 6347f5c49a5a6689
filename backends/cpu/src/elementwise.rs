//! Elementwise kernels: broadcast binary ops, affine, unary functions and their backward.

use std::mem::MaybeUninit;

use lisa_core::Result;
use lisa_core::backend::{BinaryOp, Shape, UnaryOp};
use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::vectorised;
use crate::uninit::written_once;

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
    // One loop per op (chosen here, not per element), so that each vectorises.
    match op {
        BinaryOp::Add => broadcast_zip(a, sa, b, sb, out_shape, |x, y| x + y),
        BinaryOp::Sub => broadcast_zip(a, sa, b, sb, out_shape, |x, y| x - y),
        BinaryOp::Mul => broadcast_zip(a, sa, b, sb, out_shape, |x, y| x * y),
        BinaryOp::Div => broadcast_zip(a, sa, b, sb, out_shape, |x, y| x / y),
    }
}

/// `f(a, b)` into `out` of the broadcast shape `out_shape`.
fn broadcast_zip(
    a: &[f32],
    sa: &Shape,
    b: &[f32],
    sb: &Shape,
    out_shape: &Shape,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Vec<f32>> {
    let n = out_shape.num_elements()?;
    if n == 0 {
        return Ok(Vec::new());
    }
    // Fast paths: equal shapes; one side full and the other one value per plane of trailing
    // dims (a ResBlock's time-embedding add: [n, c, 1, 1] over [n, c, h, w]).
    if sa == sb {
        return Ok(zip_map(a, b, f));
    }
    if sa == out_shape
        && let Some(plane) = per_plane(sb, out_shape)
    {
        return Ok(zip_per_plane(a, b, plane, f));
    }
    if sb == out_shape
        && let Some(plane) = per_plane(sa, out_shape)
    {
        return Ok(zip_per_plane(b, a, plane, |y, x| f(x, y)));
    }
    // General path: rows of the last output dim; each side steps by 0 or 1 inside a row.
    let dims = out_shape.dims();
    let (ta, tb) = (sa.broadcast_strides(out_shape), sb.broadcast_strides(out_shape));
    let (last, inner_a, inner_b) = match dims.last() {
        Some(&l) => (l, *ta.last().unwrap_or(&0), *tb.last().unwrap_or(&0)),
        None => (1, 0, 0), // rank 0: a single element
    };
    let rows_per_task = (CHUNK / last.max(1)).max(1);
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(rows_per_task * last).enumerate().for_each(|(task, chunk)| {
            vectorised(|| {
                for (r, row) in chunk.chunks_mut(last).enumerate() {
                    let row_index = task * rows_per_task + r;
                    let (oa, ob) = (row_offset(dims, &ta, row_index), row_offset(dims, &tb, row_index));
                    match (inner_a, inner_b) {
                        (1, 1) => {
                            row.iter_mut().zip(&a[oa..oa + last]).zip(&b[ob..ob + last]).for_each(|((o, &x), &y)| {
                                o.write(f(x, y));
                            })
                        }
                        (1, _) => {
                            let y = b[ob];
                            row.iter_mut().zip(&a[oa..oa + last]).for_each(|(o, &x)| {
                                o.write(f(x, y));
                            });
                        }
                        (_, 1) => {
                            let x = a[oa];
                            row.iter_mut().zip(&b[ob..ob + last]).for_each(|(o, &y)| {
                                o.write(f(x, y));
                            });
                        }
                        _ => row.iter_mut().for_each(|o| {
                            o.write(f(a[oa], b[ob]));
                        }),
                    }
                }
            })
        })
    };
    // SAFETY: the chunks are whole rows covering all `n` elements (`n` is a multiple of
    // `last`), and every row writes each of its elements.
    Ok(unsafe { written_once(n, write) }.0)
}

/// `Some(plane)` when `s`, broadcast to `out`, holds one value per `plane` consecutive elements
/// of `out`: `s` is `out`'s leading dims followed by ones (missing leading dims count as ones
/// only where `out`'s are ones too).
fn per_plane(s: &Shape, out: &Shape) -> Option<usize> {
    let (dims, od) = (s.dims(), out.dims());
    if dims.len() > od.len() {
        return None;
    }
    let padded: Vec<usize> = std::iter::repeat_n(1, od.len() - dims.len()).chain(dims.iter().copied()).collect();
    let kept = padded.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    (padded[..kept] == od[..kept]).then(|| od[kept..].iter().product())
}

/// `out[i] = f(full[i], per_plane[i / plane])`, in parallel chunks (written once).
fn zip_per_plane(full: &[f32], per_plane: &[f32], plane: usize, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK).zip(full.par_chunks(CHUNK)).enumerate().for_each(|(task, (o, x))| {
            vectorised(|| {
                // Runs of the chunk that lie in one plane.
                let (mut at, mut done) = (task * CHUNK, 0);
                while done < o.len() {
                    let run = (plane - at % plane).min(o.len() - done);
                    let y = per_plane[at / plane];
                    for (o, &x) in o[done..done + run].iter_mut().zip(&x[done..done + run]) {
                        o.write(f(x, y));
                    }
                    (at, done) = (at + run, done + run);
                }
            })
        })
    };
    // SAFETY: the chunks cover all `full.len()` elements, and each chunk's runs cover it.
    unsafe { written_once(full.len(), write) }.0
}

/// `out[i] = f(x[i])` over one chunk (every element of `out` written), vectorised for the
/// CPU's widest vector registers (`simd.rs`).
#[inline(always)]
fn map_chunk(out: &mut [MaybeUninit<f32>], x: &[f32], f: &impl Fn(f32) -> f32) {
    vectorised(|| {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(f(x));
        }
    })
}

/// `v[i] ← silu(v[i])` in place (a slice already in cache), vectorised.
pub(crate) fn silu_in_place(v: &mut [f32]) {
    vectorised(|| v.iter_mut().for_each(|z| *z = silu(*z)))
}

/// `v[i] ← g[i]·silu'(v[i])` in place: `v` holds the pre-activation, then its gradient.
pub(crate) fn silu_backward_in_place(v: &mut [f32], g: &[f32]) {
    vectorised(|| v.iter_mut().zip(g).for_each(|(z, &g)| *z = g * silu_derivative(*z)))
}

/// `out[i] = f(x[i], y[i])` over one chunk (every element written), vectorised.
#[inline(always)]
fn zip_map_chunk(out: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], f: &impl Fn(f32, f32) -> f32) {
    vectorised(|| {
        for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
            o.write(f(x, y));
        }
    })
}

/// `f(x)` for every element, in parallel (into a buffer written once, not zeroed first).
pub(crate) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| map_chunk(o, x, &f))
    };
    // SAFETY: the chunks cover all `x.len()` elements and `map_chunk` writes each of them.
    unsafe { written_once(x.len(), write) }.0
}

/// `f(x, y)` for every pair of elements of equal-length slices, in parallel (written once).
pub(crate) fn zip_map(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(x.len(), y.len(), "zip_map: lengths");
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(y.par_chunks(CHUNK))
            .for_each(|((o, x), y)| zip_map_chunk(o, x, y, &f))
    };
    // SAFETY: the chunks cover all `x.len()` elements and `zip_map_chunk` writes each of them.
    unsafe { written_once(x.len(), write) }.0
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
