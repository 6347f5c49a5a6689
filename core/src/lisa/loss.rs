use super::distance::scaled_sums;
use super::{Distance, LisaConfig, SampleTerms};
use crate::real::Real;
use crate::slices::{check_len, per_sample_len};
use crate::{Error, Result};

/// The value of the LISA term of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LisaLoss<F> {
    /// `λ·Σ_b w_b·D_b`: what is added to the diffusion loss.
    pub weighted: F,
    /// `Σ_b w_b·D_b` before λ (what to log as "LISA loss").
    pub distance: F,
    /// The same distance for a decoder that outputs zeros (`D_b(0, τ_b)`: `‖τ_b‖²/N·w_b` for
    /// MSE, `w_b/B` for cosine), from the same per-sample sums: `1 − distance/zero_distance`
    /// is the share of `τ` the decoder explains.
    pub zero_distance: F,
}

/// The LISA term and its gradient w.r.t. the decoder output, given a precomputed `τ`.
///
/// - MSE: `L = λ·(1/N)·Σ_b w_b·Σ_i (d − τ)²`, `∂L/∂d = 2λ·w_b·(d − τ)/N`, `N` = all elements.
/// - Cosine: `L = λ·(1/B)·Σ_b w_b·(1 − cos_b)` with
///   `∂cos/∂d = τ/(n_d n_τ) − ⟨d,τ⟩·d/(n_d³ n_τ)` (the second term vanishes while `‖d‖ < ε`).
///
/// Shapes: `decoded`, `tau`, `grad` are `[B, …]` with `B = terms.len()`.
pub fn lisa_loss<F: Real>(
    config: &LisaConfig,
    terms: &[SampleTerms<F>],
    decoded: &[F],
    tau: &[F],
    grad: &mut [F],
) -> Result<LisaLoss<F>> {
    check_len("lisa_loss", decoded.len(), &[tau.len(), grad.len()])?;
    let unit: SampleTerms<F> = SampleTerms::unit();
    // τ given directly: the fused path with y = τ, prior = 0 and unit scales.
    let unscaled = |_: usize, i: usize| tau[i];
    fused_impl(
        "lisa_loss",
        config,
        terms.len(),
        |b| SampleTerms { target_scale: unit.target_scale, weight: terms[b].weight },
        decoded,
        unscaled,
        grad,
    )
}

/// The fused LISA target + loss + backward: computes `τ = scale_b·(y − prior)` on the fly,
/// without materialising it, and returns the term with `∂L/∂d` in `grad`.
pub fn lisa_loss_fused<F: Real>(
    config: &LisaConfig,
    terms: &[SampleTerms<F>],
    decoded: &[F],
    y: &[F],
    prior: &[F],
    grad: &mut [F],
) -> Result<LisaLoss<F>> {
    check_len("lisa_loss_fused", decoded.len(), &[y.len(), prior.len(), grad.len()])?;
    let tau = |b: usize, i: usize| terms[b].target_scale * (y[i] - prior[i]);
    fused_impl("lisa_loss_fused", config, terms.len(), |b| terms[b], decoded, tau, grad)
}

/// What a device reduces per sample `b`: `Σ(d−τ)²`, and `⟨d,τ⟩`, `‖d‖²`, `‖τ‖²` over
/// `d/s_d` and `τ/s_τ` (the scales: 1 where the sums are taken unscaled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSums<F> {
    /// `Σ_i (d_i − τ_i)²`.
    pub squared_error: F,
    /// `⟨d, τ⟩/(s_d s_τ)`.
    pub dot: F,
    /// `‖d‖²/s_d²`.
    pub decoded_sq: F,
    /// `‖τ‖²/s_τ²`.
    pub target_sq: F,
    /// `s_d`.
    pub decoded_scale: F,
    /// `s_τ`.
    pub target_scale: F,
}

impl<F: Real> SampleSums<F> {
    /// The sums an all-zero decoder output would give with the same `τ`: `Σ(0 − τ)² = ‖τ‖²`,
    /// no dot product, no `‖d‖`.
    pub fn of_zero_decoder(&self) -> Self {
        Self {
            squared_error: self.target_sq * self.target_scale * self.target_scale,
            dot: F::zero(),
            decoded_sq: F::zero(),
            target_sq: self.target_sq,
            decoded_scale: F::one(),
            target_scale: self.target_scale,
        }
    }

    /// Unscaled sums (`s_d = s_τ = 1`), as a device reduction returns them.
    pub fn unscaled(squared_error: F, dot: F, decoded_sq: F, target_sq: F) -> Self {
        Self { squared_error, dot, decoded_sq, target_sq, decoded_scale: F::one(), target_scale: F::one() }
    }

    /// `(c_d, c_τ, cos)` with `c = max(‖·‖, ε)` and `cos = ⟨d,τ⟩/(c_d c_τ)`, computed without
    /// forming `‖d‖²` unscaled. NaN when a sum is not finite (an overflowed device sum must
    /// fail, not read as orthogonal).
    pub fn cosine(&self, eps: F) -> (F, F, F) {
        if !(self.dot.is_finite() && self.decoded_sq.is_finite() && self.target_sq.is_finite()) {
            return (F::nan(), F::nan(), F::nan());
        }
        let (cd, ct) = (
            (self.decoded_scale * self.decoded_sq.sqrt()).max(eps),
            (self.target_scale * self.target_sq.sqrt()).max(eps),
        );
        (cd, ct, self.dot * (self.decoded_scale / cd) * (self.target_scale / ct))
    }
}

/// One sample's share of the LISA distance and its gradient, `∂L/∂d = α·d + β·τ`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleCoefficients<F> {
    /// `w_b·D_b` (summed over samples: the distance before λ).
    pub distance: F,
    /// `α_b`.
    pub alpha: F,
    /// `β_b`.
    pub beta: F,
}

/// The per-sample distance and gradient coefficients from a sample's [`SampleSums`], with
/// `len` = all elements of the batch and `batch` = `B` (what a GPU kernel needs on the host):
/// - MSE: `w_b·D_b = w_b·Σ(d−τ)²/N`, `α_b = 2λw_b/N`, `β_b = −α_b`;
/// - cosine: `w_b·D_b = w_b·(1 − ⟨d,τ⟩/(c_d c_τ))/B` with `c = max(‖·‖, ε)`,
///   `∂L/∂d = −λw_b/B·(τ − [‖d‖ ≥ ε]·⟨d,τ⟩/c_d²·d)/(c_d c_τ)`.
pub fn sample_coefficients<F: Real>(
    config: &LisaConfig,
    weight: F,
    sums: &SampleSums<F>,
    len: usize,
    batch: usize,
) -> SampleCoefficients<F> {
    let lambda = F::lit(config.lambda);
    match config.distance {
        Distance::Mse => {
            let inv_n = F::one() / F::lit(len as f64);
            let alpha = F::lit(2.0) * lambda * weight * inv_n;
            SampleCoefficients { distance: weight * sums.squared_error * inv_n, alpha, beta: -alpha }
        }
        Distance::Cosine => {
            let eps = F::lit(config.cosine_eps);
            let inv_b = F::one() / F::lit(batch as f64);
            let (cd, ct, cos) = sums.cosine(eps);
            let norm_d = sums.decoded_scale * sums.decoded_sq.sqrt();
            // ∂(1 − cos)/∂d = −τ/(c_d c_τ) + [‖d‖ ≥ ε]·cos·d/c_d²
            let g = -lambda * weight * inv_b;
            let radial = if norm_d >= eps { cos } else { F::zero() };
            SampleCoefficients {
                distance: weight * (F::one() - cos) * inv_b,
                alpha: -g * radial / cd / cd,
                beta: g / cd / ct,
            }
        }
    }
}

fn fused_impl<F: Real>(
    op: &'static str,
    config: &LisaConfig,
    batch: usize,
    term: impl Fn(usize) -> SampleTerms<F>,
    decoded: &[F],
    tau: impl Fn(usize, usize) -> F,
    grad: &mut [F],
) -> Result<LisaLoss<F>> {
    config.validate()?;
    let per = per_sample_len(op, decoded.len(), batch)?;
    let lambda = F::lit(config.lambda);
    let (mut distance, mut zero_distance) = (F::zero(), F::zero());
    let n = decoded.len();
    match config.distance {
        Distance::Mse => {
            // One pass: the sum and `∂L/∂d = α_b(d − τ)` with α_b of [`sample_coefficients`],
            // applied as `((2λw_b)·(d − τ))/N` (the order the CPU results are pinned to).
            let inv_n = F::one() / F::lit(decoded.len() as f64);
            for b in 0..batch {
                let w = term(b).weight;
                let (mut sum, mut tau_sq) = (F::zero(), F::zero());
                for i in b * per..(b + 1) * per {
                    let t = tau(b, i);
                    let diff = decoded[i] - t;
                    sum = sum + diff * diff;
                    tau_sq = tau_sq + t * t;
                    grad[i] = F::lit(2.0) * lambda * w * diff * inv_n;
                }
                let sums = SampleSums::unscaled(sum, F::zero(), F::zero(), tau_sq);
                distance = distance + sample_coefficients(config, w, &sums, n, batch).distance;
                zero_distance =
                    zero_distance + sample_coefficients(config, w, &sums.of_zero_decoder(), n, batch).distance;
            }
        }
        Distance::Cosine => {
            for b in 0..batch {
                let r = b * per..(b + 1) * per;
                let sums = scaled_sums(r.clone().map(|i| (decoded[i], tau(b, i))));
                let w = term(b).weight;
                let c = sample_coefficients(config, w, &sums, n, batch);
                distance = distance + c.distance;
                zero_distance =
                    zero_distance + sample_coefficients(config, w, &sums.of_zero_decoder(), n, batch).distance;
                for i in r {
                    grad[i] = c.alpha * decoded[i] + c.beta * tau(b, i);
                }
            }
        }
    }
    let weighted = lambda * distance;
    if !weighted.is_finite() || !distance.is_finite() {
        return Err(Error::NonFinite { op });
    }
    Ok(LisaLoss { weighted, distance, zero_distance })
}
