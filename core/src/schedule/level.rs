use crate::real::Real;
use crate::slices::map2_per_sample;
use crate::{Error, Result};

/// The coefficients of the forward process at one time: `x_t = α·x₀ + σ·ε`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NoiseLevel<F> {
    /// Signal coefficient α_t.
    pub alpha: F,
    /// Noise coefficient σ_t.
    pub sigma: F,
}

impl<F: Real> NoiseLevel<F> {
    /// A level from `(α, σ)`; both finite, non-negative, not both zero.
    pub fn new(alpha: F, sigma: F) -> Result<Self> {
        let ok = alpha.is_finite() && sigma.is_finite() && alpha >= F::zero() && sigma >= F::zero();
        if !ok || (alpha == F::zero() && sigma == F::zero()) {
            return Err(Error::DegenerateNoiseLevel {
                op: "NoiseLevel::new",
                alpha: alpha.to_f64_lossless(),
                sigma: sigma.to_f64_lossless(),
            });
        }
        Ok(Self { alpha, sigma })
    }

    /// Signal-to-noise ratio `SNR = α² / σ²` (infinite at σ = 0).
    pub fn snr(&self) -> F {
        (self.alpha * self.alpha) / (self.sigma * self.sigma)
    }

    /// `log SNR = 2·(ln α − ln σ)`.
    pub fn log_snr(&self) -> F {
        F::lit(2.0) * (self.alpha.ln() - self.sigma.ln())
    }

    /// Forward process `x_t = α·x₀ + σ·ε` for one element.
    #[inline]
    pub fn add_noise(&self, x0: F, eps: F) -> F {
        self.alpha * x0 + self.sigma * eps
    }

    /// VP "v" target (Salimans & Ho 2022) `v = α·ε − σ·x₀` for one element.
    #[inline]
    pub fn velocity(&self, x0: F, eps: F) -> F {
        self.alpha * eps - self.sigma * x0
    }

    /// Flow-matching velocity `u = ε − x₀` (= d x_t / dt for rectified flow).
    #[inline]
    pub fn flow_velocity(&self, x0: F, eps: F) -> F {
        eps - x0
    }
}

/// `out[b, i] = α_b·x0[b, i] + σ_b·eps[b, i]` for a batch with one level per sample.
pub fn add_noise_batch<F: Real>(levels: &[NoiseLevel<F>], x0: &[F], eps: &[F], out: &mut [F]) -> Result<()> {
    map2_per_sample("add_noise_batch", levels, x0, eps, out, |&level| Ok(move |x, e| level.add_noise(x, e)))
}
