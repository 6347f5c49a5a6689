//! DDIM (Song et al. 2021), as diffusers' `DDIMScheduler` with `set_alpha_to_one = True`.

use lisa_core::backend::Backend;

use super::{Previous, Scheduler, SpacedSchedule};
use crate::error::{Result, TrainError};

/// DDIM with stochasticity η on a discrete VP schedule.
pub struct Ddim {
    spaced: SpacedSchedule,
    eta: f32,
}

impl Ddim {
    /// DDIM over `spaced` with η ∈ [0, 1].
    pub fn new(spaced: SpacedSchedule, eta: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(TrainError::Config(format!("DDIM eta must lie in [0, 1], got {eta}")));
        }
        Ok(Self { spaced, eta })
    }
}

impl<B: Backend> Scheduler<B> for Ddim {
    fn timesteps(&self) -> &[f32] {
        &self.spaced.values
    }

    /// `x₀ = f(x_t, p)` (clipped), `ε = (x_t − α x₀)/σ`,
    /// `σ_η = η·√((1−ā_prev)/(1−ā_t))·√(1 − ā_t/ā_prev)`,
    /// `x_prev = √ā_prev·x₀ + √(1 − ā_prev − σ_η²)·ε + σ_η·z`.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let (_, level, a_t, a_prev) = self.spaced.at(k, Previous::Stride)?;
        let x0 = self.spaced.predicted_sample::<B>(level, x, pred)?;
        // ε consistent with the (clipped) x₀: ε = (x_t − α x₀)/σ.
        let eps = B::axpby(1.0 / level.sigma, x, -level.alpha / level.sigma, &x0)?;
        let sigma = self.eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).max(0.0).sqrt();
        let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        let x = B::axpby(a_prev.sqrt(), &x0, dir, &eps)?;
        if sigma > 0.0 {
            return Ok(B::axpby(1.0, &x, sigma, &self.spaced.noise::<B>(k, &x)?)?);
        }
        Ok(x)
    }
}
