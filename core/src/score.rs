//! The score decomposition of a dual-branch model (docs/method.md §2).
//!
//! Bayes with `x = x_t`:
//! `∇log p(x | c_v, c_txt) = ∇log p(x | c_txt) + ∇log p(c_v | x, c_txt)`,
//! i.e. **conditional = prior + likelihood**. The frozen main network gives the prior, the
//! side network's residuals add the likelihood.
//!
//! Two unit systems are used and every function says which:
//! - *prediction units* (ε, v, x₀ or u, whatever the model outputs): the likelihood is
//!   `Δ = p_cond − p_prior`. For ε-prediction `Δ = −σ_t·∇log p(c_v | x)`.
//! - *score units* (`∇_{x_t} log p`): since every prediction maps to the score by the same
//!   affine map at a given level, `∇log p(c_v|x) = b·Δ` where `b` is
//!   [`Prediction::to_score`]'s `pred` coefficient (`−1/σ` for ε; `−(1−t)/t` for flow).

use crate::Result;
use crate::prediction::Prediction;
use crate::real::Real;
use crate::schedule::NoiseLevel;
use crate::slices::{check_len, map2_per_sample};

/// The likelihood term in prediction units, `Δ = p_cond − p_prior`, elementwise.
pub fn likelihood<F: Real>(conditional: &[F], prior: &[F], out: &mut [F]) -> Result<()> {
    check_len("score::likelihood", conditional.len(), &[prior.len(), out.len()])?;
    for ((o, &c), &p) in out.iter_mut().zip(conditional).zip(prior) {
        *o = c - p;
    }
    Ok(())
}

/// The conditional in either unit system, `conditional = prior + likelihood`, elementwise.
pub fn conditional<F: Real>(prior: &[F], likelihood: &[F], out: &mut [F]) -> Result<()> {
    guided(prior, likelihood, F::one(), out)
}

/// Guided combination `prior + w·likelihood` (classifier-free / control scale `w`;
/// `w = 1` is the plain conditional, `w = 0` the prior). Units are those of the inputs.
pub fn guided<F: Real>(prior: &[F], likelihood: &[F], w: F, out: &mut [F]) -> Result<()> {
    check_len("score::guided", prior.len(), &[likelihood.len(), out.len()])?;
    for ((o, &p), &l) in out.iter_mut().zip(prior).zip(likelihood) {
        *o = p + w * l;
    }
    Ok(())
}

/// Guidance straight from two predictions: `prior + w·(conditional − prior)`.
pub fn guided_from_predictions<F: Real>(prior: &[F], conditional: &[F], w: F, out: &mut [F]) -> Result<()> {
    check_len("score::guided_from_predictions", prior.len(), &[conditional.len(), out.len()])?;
    for ((o, &p), &c) in out.iter_mut().zip(prior).zip(conditional) {
        *o = p + w * (c - p);
    }
    Ok(())
}

/// The factor `b` with `∇log p(c_v | x_t) = b·(p_cond − p_prior)` (score units per
/// prediction unit): `−1/σ` for ε, `−α/σ` for v (VP), `α/σ²` for x₀, `−(1 − t)/t` for flow.
pub fn likelihood_score_scale<F: Real>(kind: Prediction, level: NoiseLevel<F>) -> Result<F> {
    Ok(kind.to_score(level)?.pred)
}

/// The likelihood in score units for a batch, one level per sample:
/// `out[b, i] = b_b·(cond[b, i] − prior[b, i])`.
pub fn likelihood_score_batch<F: Real>(
    kind: Prediction,
    levels: &[NoiseLevel<F>],
    conditional: &[F],
    prior: &[F],
    out: &mut [F],
) -> Result<()> {
    map2_per_sample("score::likelihood_score_batch", levels, conditional, prior, out, |&level| {
        let s = likelihood_score_scale(kind, level)?;
        Ok(move |c: F, p: F| s * (c - p))
    })
}
