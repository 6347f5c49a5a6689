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
pub fn cosine_distance<F: Real>(d: &[F], tau: &[F], eps: F) -> Result<F> {
    check_len("cosine_distance", d.len(), &[tau.len()])?;
    let (dot, dd, tt) = dot_norms(d.iter().copied().zip(tau.iter().copied()));
    Ok(F::one() - dot / (dd.sqrt().max(eps) * tt.sqrt().max(eps)))
}

/// `(⟨d, τ⟩, ‖d‖², ‖τ‖²)` in one pass.
pub(super) fn dot_norms<F: Real>(pairs: impl Iterator<Item = (F, F)>) -> (F, F, F) {
    pairs.fold((F::zero(), F::zero(), F::zero()), |(dot, dd, tt), (d, t)| (dot + d * t, dd + d * d, tt + t * t))
}
