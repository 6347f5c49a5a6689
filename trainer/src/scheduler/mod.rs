//! The forward noising process of training and the reverse-process schedulers of sampling.
//!
//! A [`Scheduler`] is set up for a number of sampling steps with one of diffusers' timestep
//! spacings ([`Spacing`]), then takes the model's prediction at each of its
//! [`Scheduler::timesteps`] and returns the next, less noisy sample ([`Scheduler::step`]).
//! DDPM and DDIM run on discrete VP schedules, Euler on rectified flows. They know nothing
//! of models or training: [`build`] makes one from the noise process and a
//! [`SchedulerConfig`].

mod ddim;
mod ddpm;
mod discrete;
mod euler;
mod noise;
mod spacing;

use lisa_core::Prediction;
use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use discrete::{Previous, SpacedSchedule};
pub use euler::EulerFlow;
pub use noise::{FlowWeighting, NoiseConfig, NoiseProcess, add_noise};
pub use spacing::Spacing;

use crate::error::{Result, TrainError};

/// A reverse-process step rule over a fixed list of timesteps.
pub trait Scheduler<B: Backend> {
    /// The timestep value the model sees at each step, first (noisiest) to last.
    fn timesteps(&self) -> &[f32];

    /// `x_{k+1}` from `x_k` and the model's prediction `pred` at `timesteps()[k]`.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor>;
}

/// The reverse process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Sampler {
    /// DDIM (Song et al. 2021) with stochasticity η (0: deterministic).
    Ddim {
        /// η ∈ [0, 1].
        eta: f32,
    },
    /// Ancestral DDPM (Ho et al. 2020) on the spaced schedule, posterior variance
    /// "fixed_small" (diffusers' `DDPMScheduler`).
    Ddpm,
    /// Euler steps of the flow ODE `dx/dt = u` from t = 1 to 0 (rectified flow only).
    Euler,
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sampler::Ddim { eta } => write!(f, "ddim (eta {eta})"),
            Sampler::Ddpm => f.write_str("ddpm"),
            Sampler::Euler => f.write_str("euler"),
        }
    }
}

/// What [`build`] needs besides the noise process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// The step rule.
    pub sampler: Sampler,
    /// Number of steps (model evaluations per guidance branch).
    pub steps: usize,
    /// Timestep spacing of discrete schedules (None: leading); flows step uniformly in `t`.
    pub spacing: Option<Spacing>,
    /// What the model predicts.
    pub prediction: Prediction,
    /// Clip the predicted `x₀` to [−1, 1] at each discrete step (pixel-space models).
    pub clip_sample: bool,
    /// Seed of the noise stochastic steps add (step `k` draws with `seed + 1 + k`).
    pub seed: u64,
}

/// The scheduler `config` asks for on the noise process `noise`; a combination that does
/// not apply (DDIM on a flow, Euler on a diffusion schedule, a spacing on a flow) is an
/// error that says so.
pub fn build<B: Backend>(noise: &NoiseConfig, config: &SchedulerConfig) -> Result<Box<dyn Scheduler<B>>> {
    if config.steps == 0 {
        return Err(TrainError::Config("sampling needs steps >= 1".into()));
    }
    match (*noise, config.sampler) {
        (NoiseConfig::Diffusion { betas, num_train_timesteps }, Sampler::Ddim { eta }) => {
            Ok(Box::new(Ddim::new(SpacedSchedule::new(betas, num_train_timesteps, config)?, eta)?))
        }
        (NoiseConfig::Diffusion { betas, num_train_timesteps }, Sampler::Ddpm) => {
            Ok(Box::new(Ddpm::new(SpacedSchedule::new(betas, num_train_timesteps, config)?)))
        }
        (NoiseConfig::Flow { sampling_shift: Some(shift), .. }, Sampler::Euler) => {
            Ok(Box::new(EulerFlow::flux(shift, config)?))
        }
        (NoiseConfig::Flow { shift, num_train_timesteps, .. }, Sampler::Euler) => {
            Ok(Box::new(EulerFlow::new(shift, num_train_timesteps, config)?))
        }
        (NoiseConfig::Flow { .. }, sampler) => Err(TrainError::Config(format!(
            "the {sampler} sampler needs a diffusion schedule; this model is a rectified flow (use euler)"
        ))),
        (NoiseConfig::Diffusion { .. }, sampler) => Err(TrainError::Config(format!(
            "the {sampler} sampler needs a rectified flow; this model is a diffusion model (use ddim or ddpm)"
        ))),
    }
}
