use alloc::format;

use super::NoiseLevel;
use crate::real::Real;
use crate::{Error, Result};

/// Continuous-time variance-preserving schedules on `t ∈ [0, 1]`:
/// `α_t = √ᾱ(t)`, `σ_t = √(1 − ᾱ(t))`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum ContinuousVp {
    /// VP-SDE of Song et al. 2021: `ᾱ(t) = exp(−β_min·t − ½(β_max − β_min)·t²)`
    /// (defaults β_min = 0.1, β_max = 20).
    Linear {
        /// β(0).
        beta_min: f64,
        /// β(1).
        beta_max: f64,
    },
    /// Nichol & Dhariwal cosine: `ᾱ(t) = cos²((t + s)/(1 + s) · π/2) / cos²(s/(1 + s) · π/2)`.
    Cosine {
        /// Offset s (0.008).
        s: f64,
    },
}

impl ContinuousVp {
    /// `ᾱ(t)` for `t ∈ [0, 1]`.
    pub fn alpha_bar<F: Real>(&self, t: F) -> Result<F> {
        const OP: &str = "ContinuousVp::alpha_bar";
        if !(t >= F::zero() && t <= F::one()) {
            return Err(Error::invalid(OP, format!("t must lie in [0, 1], got {t}")));
        }
        match *self {
            ContinuousVp::Linear { beta_min, beta_max } => {
                if !(beta_min >= 0.0 && beta_max >= beta_min && beta_max.is_finite()) {
                    return Err(Error::invalid(
                        OP,
                        format!("need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}"),
                    ));
                }
                let (b0, b1) = (F::lit(beta_min), F::lit(beta_max));
                Ok((-(b0 * t) - F::lit(0.5) * (b1 - b0) * t * t).exp())
            }
            ContinuousVp::Cosine { s } => {
                if !(s > 0.0 && s.is_finite()) {
                    return Err(Error::invalid(OP, format!("s must be > 0, got {s}")));
                }
                let s = F::lit(s);
                let f = |u: F| {
                    let c = ((u + s) / (F::one() + s) * F::FRAC_PI_2()).cos();
                    c * c
                };
                Ok((f(t) / f(F::zero())).min(F::one()).max(F::zero()))
            }
        }
    }

    /// The [`NoiseLevel`] at `t ∈ [0, 1]`.
    pub fn level<F: Real>(&self, t: F) -> Result<NoiseLevel<F>> {
        let ab = self.alpha_bar(t)?;
        NoiseLevel::new(ab.sqrt(), (F::one() - ab).max(F::zero()).sqrt())
    }
}
