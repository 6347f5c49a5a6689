//! What DDPM and DDIM share: a discrete VP schedule visited at spaced timesteps, and the
//! predicted clean sample.

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType};
use lisa_core::schedule::{BetaSchedule, DiscreteVp};

use super::SchedulerConfig;
use crate::error::{Result, TrainError};

/// Which timestep a step goes back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// `t − ⌊T/n⌋` (diffusers' DDIM).
    Stride,
    /// The next listed timestep (diffusers' DDPM `previous_timestep`).
    Listed,
}

/// A discrete VP schedule with `n` of its `T` timesteps picked by a [`super::Spacing`].
pub struct SpacedSchedule {
    schedule: DiscreteVp<f32>,
    /// The visited timesteps, noisiest first.
    pub timesteps: Vec<usize>,
    /// The same as the model's timestep input.
    pub values: Vec<f32>,
    /// `⌊T/n⌋`: how far back a step goes (diffusers' `prev_timestep = t − T // n`).
    ratio: usize,
    /// The scheduler's settings.
    pub config: SchedulerConfig,
}

impl SpacedSchedule {
    /// `config.steps` timesteps of the `betas` schedule with `T` training timesteps.
    pub fn new(betas: BetaSchedule, t_train: usize, config: &SchedulerConfig) -> Result<Self> {
        let timesteps = config.spacing.unwrap_or_default().timesteps(config.steps, t_train)?;
        Ok(Self {
            schedule: DiscreteVp::new(betas, t_train)?,
            values: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            ratio: (t_train / config.steps).max(1),
            config: *config,
        })
    }

    /// At step `k`: `(t, its level, ā_t, ā_prev)` with `ā_prev` at `prev`, 1 past the end.
    pub fn at(&self, k: usize, prev: Previous) -> Result<(usize, NoiseLevel<f32>, f32, f32)> {
        let t = *self
            .timesteps
            .get(k)
            .ok_or_else(|| TrainError::Mismatch(format!("step {k} of a {}-step schedule", self.timesteps.len())))?;
        let ac = self.schedule.alphas_cumprod();
        let prev_t = match prev {
            Previous::Stride => t.checked_sub(self.ratio),
            Previous::Listed => self.timesteps.get(k + 1).copied(),
        };
        Ok((t, self.schedule.level(t)?, ac[t], prev_t.map_or(1.0, |p| ac[p])))
    }

    /// `x₀` from the model's prediction at `level`, clipped to [−1, 1] when configured.
    pub fn predicted_sample<B: Backend>(
        &self,
        level: NoiseLevel<f32>,
        x: &B::Tensor,
        pred: &B::Tensor,
    ) -> Result<B::Tensor> {
        let to_x0 = self.config.prediction.to_sample(level)?;
        let x0 = B::axpby(to_x0.x_t, x, to_x0.pred, pred)?;
        if !self.config.clip_sample {
            return Ok(x0);
        }
        let clipped: Vec<f32> = B::to_vec(&x0)?.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect();
        Ok(B::from_slice(&clipped, &B::shape(&x0), DType::F32, &B::device(&x0))?)
    }

    /// Standard normal noise for stochastic step `k` (seed `seed + 1 + k`), shaped like `x`.
    pub fn noise<B: Backend>(&self, k: usize, x: &B::Tensor) -> Result<B::Tensor> {
        let seed = self.config.seed.wrapping_add(1 + k as u64);
        Ok(B::random_normal(&B::shape(x), seed, DType::F32, &B::device(x))?)
    }
}
