use alloc::format;

use crate::prediction::Prediction;
use crate::real::Real;
use crate::schedule::NoiseLevel;
use crate::score::likelihood_score_scale;
use crate::{Error, Result};

/// In which units `τ` and the decoder output live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum TargetSpace {
    /// `τ = y − p_prior` in the model's prediction units (authors' code; default).
    #[default]
    Prediction,
    /// `τ = b_t·(y − p_prior)`, the likelihood score `∇log p(c_v|x_t)` itself.
    /// Its scale grows like `1/σ_t` at low noise: pair it with a weighting.
    Score,
}

/// The distance between the decoder output and `τ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Distance {
    /// Mean squared error over all elements (torch's `mse_loss`, reduction="mean"); default.
    #[default]
    Mse,
    /// Per-sample cosine distance `1 − ⟨d, τ⟩ / (max(‖d‖, ε)·max(‖τ‖, ε))`, mean over the batch
    /// (declared by the authors, never implemented by them). Bounded in `[0, 2]`, invariant
    /// to positive rescaling of either argument.
    Cosine,
}

impl core::str::FromStr for TargetSpace {
    type Err = Error;

    /// `prediction` | `score` (the run-file spelling).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "prediction" => Ok(Self::Prediction),
            "score" => Ok(Self::Score),
            _ => Err(Error::invalid("target_space", format!("{s:?} is not one of prediction | score"))),
        }
    }
}

impl core::str::FromStr for Distance {
    type Err = Error;

    /// `mse` | `cosine` (the run-file spelling).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(Self::Mse),
            "cosine" => Ok(Self::Cosine),
            _ => Err(Error::invalid("distance", format!("{s:?} is not one of mse | cosine"))),
        }
    }
}

/// Per-timestep weight `w_b` of the LISA term.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Weighting {
    /// `w = 1` (authors' code; default).
    #[default]
    None,
    /// `w = SNR_t = α²/σ²`.
    Snr,
    /// Min-SNR-γ (Hang et al. 2023) for any parameterisation: the x₀-space weight
    /// `min(SNR, γ)` carried into prediction units, `w = min(SNR, γ)·c²` with `c` the
    /// coefficient of `p` in `x₀(p)` (`1/SNR` factor for ε, `1/(SNR+1)` for v, 1 for x₀,
    /// `t²` for flow).
    MinSnr {
        /// The clamp γ (5 in the paper).
        gamma: f64,
    },
    /// `w = σ²`, the noise variance: 0 for a clean sample, growing toward pure noise (1 for VP
    /// diffusion, `t²` for flow). Weights the LISA term toward high noise; under uniform
    /// timesteps its mean is below 1 (≈ 0.72 for the DDPM linear schedule), so it also weakens λ.
    NoiseVariance,
}

/// Everything that configures the LISA term.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LisaConfig {
    /// λ, the weight of the LISA term (0.2).
    pub lambda: f64,
    /// Units of `τ` ([`TargetSpace::Prediction`]).
    pub target_space: TargetSpace,
    /// Distance ([`Distance::Mse`]).
    pub distance: Distance,
    /// Per-timestep weighting ([`Weighting::None`]).
    pub weighting: Weighting,
    /// Norm floor of the cosine distance (1e-8, as torch's `cosine_similarity`).
    pub cosine_eps: f64,
}

impl Default for LisaConfig {
    fn default() -> Self {
        Self {
            lambda: 0.2,
            target_space: TargetSpace::Prediction,
            distance: Distance::Mse,
            weighting: Weighting::None,
            cosine_eps: 1e-8,
        }
    }
}

/// The per-sample factors of the LISA term at one noise level: `τ_b = scale·(y − prior)`,
/// and the weight `w_b` of that sample's distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleTerms<F> {
    /// Multiplies `y − prior` (1 in prediction space, `b_t` in score space).
    pub target_scale: F,
    /// Weight `w_b` of the sample's distance.
    pub weight: F,
}

impl<F: Real> SampleTerms<F> {
    /// Scale 1, weight 1: the authors' configuration at any level.
    pub fn unit() -> Self {
        Self { target_scale: F::one(), weight: F::one() }
    }
}

impl LisaConfig {
    /// Checks every field's domain (λ ≥ 0 finite, γ > 0, ε > 0).
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(Error::invalid("lambda", format!("must be finite and >= 0, got {}", self.lambda)));
        }
        if !(self.cosine_eps > 0.0 && self.cosine_eps.is_finite()) {
            return Err(Error::invalid("cosine_eps", format!("must be > 0, got {}", self.cosine_eps)));
        }
        if let Weighting::MinSnr { gamma } = self.weighting
            && !(gamma > 0.0 && gamma.is_finite())
        {
            return Err(Error::invalid("weighting", format!("min-SNR gamma must be > 0, got {gamma}")));
        }
        Ok(())
    }

    /// `τ`'s scale and the distance weight for a sample of prediction type `kind` at `level`.
    pub fn sample_terms<F: Real>(&self, kind: Prediction, level: NoiseLevel<F>) -> Result<SampleTerms<F>> {
        self.validate()?;
        let target_scale = match self.target_space {
            TargetSpace::Prediction => F::one(),
            TargetSpace::Score => likelihood_score_scale(kind, level)?,
        };
        let weight = match self.weighting {
            Weighting::None => F::one(),
            Weighting::Snr => finite_snr(level)?,
            Weighting::MinSnr { gamma } => {
                let snr = finite_snr(level)?;
                let c = kind.to_sample(level)?.pred;
                snr.min(F::lit(gamma)) * c * c
            }
            Weighting::NoiseVariance => level.sigma * level.sigma,
        };
        Ok(SampleTerms { target_scale, weight })
    }
}

fn finite_snr<F: Real>(level: NoiseLevel<F>) -> Result<F> {
    let snr = level.snr();
    if snr.is_finite() {
        Ok(snr)
    } else {
        Err(Error::DegenerateNoiseLevel {
            op: "Weighting (SNR)",
            alpha: level.alpha.to_f64_lossless(),
            sigma: level.sigma.to_f64_lossless(),
        })
    }
}
