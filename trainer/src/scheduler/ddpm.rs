//! Ancestral DDPM (Ho et al. 2020), as diffusers' `DDPMScheduler` with
//! `variance_type = "fixed_small"`, on a spaced schedule.

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::schedule::{BetaSchedule, DiscreteVp};

use super::{Scheduler, SchedulerConfig};
use crate::error::Result;

/// DDPM on a discrete VP schedule.
pub struct Ddpm {
    schedule: DiscreteVp<f32>,
    timesteps: Vec<usize>,
    values: Vec<f32>,
    ratio: usize,
    config: SchedulerConfig,
}

impl Ddpm {
    /// `config.steps` steps of the `betas` schedule with `T` training timesteps.
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
}

/// `x₀` from the model's prediction at `level`, clipped to [−1, 1] when configured.
pub(super) fn predicted_sample<B: Backend>(
    config: &SchedulerConfig,
    level: NoiseLevel<f32>,
    x: &B::Tensor,
    pred: &B::Tensor,
) -> Result<B::Tensor> {
    let to_x0 = config.prediction.to_sample(level)?;
    let x0 = B::axpby(to_x0.x_t, x, to_x0.pred, pred)?;
    if !config.clip_sample {
        return Ok(x0);
    }
    let clipped: Vec<f32> = B::to_vec(&x0)?.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect();
    Ok(B::from_slice(&clipped, &B::shape(&x0), DType::F32, &B::device(&x0))?)
}

impl<B: Backend> Scheduler<B> for Ddpm {
    fn timesteps(&self) -> &[f32] {
        &self.values
    }

    /// With `ā_prev` at `prev = t − ⌊T/n⌋` (1 past the end), `α = ā_t/ā_prev`, `β = 1 − α`:
    /// `x_prev = √ā_prev·β/(1−ā_t)·x₀ + √α·(1−ā_prev)/(1−ā_t)·x_t + √((1−ā_prev)/(1−ā_t)·β)·z`,
    /// no noise at `t = 0`.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let t = self.timesteps[k];
        let ac = self.schedule.alphas_cumprod();
        let a_t = ac[t];
        let a_prev = t.checked_sub(self.ratio).map_or(1.0, |p| ac[p]);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let (alpha, beta) = (a_t / a_prev, 1.0 - a_t / a_prev);
        let x0 = predicted_sample::<B>(&self.config, self.schedule.level(t)?, x, pred)?;
        let mean = B::axpby(a_prev.sqrt() * beta / b_t, &x0, alpha.sqrt() * b_prev / b_t, x)?;
        if t == 0 {
            return Ok(mean);
        }
        let variance = (b_prev / b_t * beta).max(1e-20);
        let shape: Shape = B::shape(x);
        let z = B::random_normal(&shape, self.config.seed.wrapping_add(1 + k as u64), DType::F32, &B::device(x))?;
        Ok(B::axpby(1.0, &mean, variance.sqrt(), &z)?)
    }
}
