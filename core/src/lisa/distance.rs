use super::SampleSums;
use crate::real::Real;
use crate::slices::check_len;
use crate::{Error, Result};

/// Mean squared error `L = (1/N)·Σ (p − y)²` and its gradient `∂L/∂p = 2(p − y)/N`
/// written to `grad` (torch's `mse_loss` with reduction "mean"). The main diffusion loss.
pub fn mse_loss<F: Real>(pred: &[F], target: &[F], grad: &mut [F]) -> Result<F> {
    const OP: &str = "mse_loss";
    check_len(OP, pred.len(), &[target.len(), grad.len()])?;
    if pred.is_empty() {
        return Err(Error::Empty { op: OP });
    }
    let inv_n = F::one() / F::lit(pred.len() as f64);
    let mut sum = F::zero();
    for ((g, &p), &y) in grad.iter_mut().zip(pred).zip(target) {
        let d = p - y;
        sum = sum + d * d;
        *g = F::lit(2.0) * d * inv_n;
    }
    let loss = sum * inv_n;
    if !loss.is_finite() {
        return Err(Error::NonFinite { op: OP });
    }
    Ok(loss)
}

/// Cosine distance of one sample, `1 − ⟨d, τ⟩ / (max(‖d‖, ε)·max(‖τ‖, ε))`, in `[0, 2]`.
/// Exact for any finite input: the sums run over `d/max|d|` and `τ/max|τ|`, so `‖d‖²` cannot
/// overflow (it would from `|d| ≈ 1e154` in f64, `1.8e19` in f32).
pub fn cosine_distance<F: Real>(d: &[F], tau: &[F], eps: F) -> Result<F> {
    check_len("cosine_distance", d.len(), &[tau.len()])?;
    let sums = scaled_sums(d.iter().copied().zip(tau.iter().copied()));
    let (_, _, cos) = sums.cosine(eps);
    Ok(F::one() - cos)
}

/// [`SampleSums`] of the pairs `(d_i, τ_i)`, over `d/max|d|` and `τ/max|τ|` (two passes).
pub(super) fn scaled_sums<F: Real>(pairs: impl Iterator<Item = (F, F)> + Clone) -> SampleSums<F> {
    let (sd, st) = pairs.clone().fold((F::zero(), F::zero()), |(a, b), (d, t)| (a.max(d.abs()), b.max(t.abs())));
    let (sd, st) = (if sd > F::zero() { sd } else { F::one() }, if st > F::zero() { st } else { F::one() });
    let (dot, dd, tt) = pairs.fold((F::zero(), F::zero(), F::zero()), |(dot, dd, tt), (d, t)| {
        let (d, t) = (d / sd, t / st);
        (dot + d * t, dd + d * d, tt + t * t)
    });
    SampleSums { squared_error: F::zero(), dot, decoded_sq: dd, target_sq: tt, decoded_scale: sd, target_scale: st }
}
