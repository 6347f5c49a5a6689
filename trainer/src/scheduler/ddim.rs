//! DDIM (Song et al. 2021), as diffusers' `DDIMScheduler` with `set_alpha_to_one = True`.

use lisa_core::backend::{Backend, DType};
use lisa_core::schedule::{BetaSchedule, DiscreteVp};

use super::{Scheduler, SchedulerConfig};
use crate::error::{Result, TrainError};

/// DDIM with stochasticity η on a discrete VP schedule.
pub struct Ddim {
    schedule: DiscreteVp<f32>,
    timesteps: Vec<usize>,
    values: Vec<f32>,
    ratio: usize,
    eta: f32,
    config: SchedulerConfig,
}

impl Ddim {
    /// `config.steps` steps of the `betas` schedule with `T` training timesteps.
    pub fn new(betas: BetaSchedule, t_train: usize, eta: f32, config: &SchedulerConfig) -> Result<Self> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(TrainError::Config(format!("DDIM eta must lie in [0, 1], got {eta}")));
        }
        let timesteps = config.spacing.unwrap_or_default().timesteps(config.steps, t_train)?;
        Ok(Self {
            schedule: DiscreteVp::new(betas, t_train)?,
            values: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            ratio: (t_train / config.steps).max(1),
            eta,
            config: *config,
        })
    }
}

impl<B: Backend> Scheduler<B> for Ddim {
    fn timesteps(&self) -> &[f32] {
        &self.values
    }

    /// `x₀ = f(x_t, p)` (clipped), `ε = (x_t − α x₀)/σ`,
    /// `σ_η = η·√((1−ā_prev)/(1−ā_t))·√(1 − ā_t/ā_prev)`,
    /// `x_prev = √ā_prev·x₀ + √(1 − ā_prev − σ_η²)·ε + σ_η·z`, with `prev = t − ⌊T/n⌋` and
    /// `ā_prev = 1` past the end.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let t = self.timesteps[k];
        let level = self.schedule.level(t)?;
        let ac = self.schedule.alphas_cumprod();
        let a_t = ac[t];
        let a_prev = t.checked_sub(self.ratio).map_or(1.0, |p| ac[p]);
        let x0 = super::ddpm::predicted_sample::<B>(&self.config, level, x, pred)?;
        // ε consistent with the (clipped) x₀: ε = (x_t − α x₀)/σ.
        let eps = B::axpby(1.0 / level.sigma, x, -level.alpha / level.sigma, &x0)?;
        let sigma = self.eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).max(0.0).sqrt();
        let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
        let x = B::axpby(a_prev.sqrt(), &x0, dir, &eps)?;
        if sigma > 0.0 {
            let z = B::random_normal(
                &B::shape(&x),
                self.config.seed.wrapping_add(1 + k as u64),
                DType::F32,
                &B::device(&x),
            )?;
            return Ok(B::axpby(1.0, &x, sigma, &z)?);
        }
        Ok(x)
    }
}
