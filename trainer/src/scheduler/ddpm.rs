//! Ancestral DDPM (Ho et al. 2020), as diffusers' `DDPMScheduler` with
//! `variance_type = "fixed_small"`, on a spaced schedule.

use lisa_core::backend::Backend;

use super::{Previous, Scheduler, SpacedSchedule};
use crate::error::Result;

/// DDPM on a discrete VP schedule.
pub struct Ddpm {
    spaced: SpacedSchedule,
}

impl Ddpm {
    /// DDPM over `spaced`.
    pub fn new(spaced: SpacedSchedule) -> Self {
        Self { spaced }
    }
}

impl<B: Backend> Scheduler<B> for Ddpm {
    fn timesteps(&self) -> &[f32] {
        &self.spaced.values
    }

    /// With `ā_prev` at the next listed timestep, `α = ā_t/ā_prev`, `β = 1 − α`:
    /// `x_prev = √ā_prev·β/(1−ā_t)·x₀ + √α·(1−ā_prev)/(1−ā_t)·x_t + √((1−ā_prev)/(1−ā_t)·β)·z`,
    /// no noise at `t = 0`.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let (t, level, a_t, a_prev) = self.spaced.at(k, Previous::Listed)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let (alpha, beta) = (a_t / a_prev, 1.0 - a_t / a_prev);
        let x0 = self.spaced.predicted_sample::<B>(level, x, pred)?;
        let mean = B::axpby(a_prev.sqrt() * beta / b_t, &x0, alpha.sqrt() * b_prev / b_t, x)?;
        if t == 0 {
            return Ok(mean);
        }
        let variance = (b_prev / b_t * beta).max(1e-20);
        Ok(B::axpby(1.0, &mean, variance.sqrt(), &self.spaced.noise::<B>(k, x)?)?)
    }
}
