//! The forward process: how training draws a timestep and noises a sample,
//! `x_t = α_t·x₀ + σ_t·ε` (docs/method.md §3.1).

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The forward noising process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NoiseConfig {
    /// Discrete VP diffusion (diffusers schedules), `t ~ U{0..T−1}`.
    Diffusion {
        /// β schedule.
        betas: BetaSchedule,
        /// `T`.
        num_train_timesteps: usize,
    },
    /// Rectified flow, `t ~ U(0, 1)` (embedded as 1000·t).
    Flow {
        /// SD3 shift.
        shift: Option<f64>,
    },
}

impl Default for NoiseConfig {
    fn default() -> Self {
        NoiseConfig::Diffusion { betas: BetaSchedule::DDPM_LINEAR, num_train_timesteps: 1000 }
    }
}

/// The forward process, prepared.
pub enum NoiseProcess {
    /// Discrete VP diffusion.
    Diffusion(DiscreteVp<f32>),
    /// Rectified flow.
    Flow(RectifiedFlow),
}

impl NoiseProcess {
    /// Prepares `config`.
    pub fn new(config: &NoiseConfig) -> Result<Self> {
        Ok(match *config {
            NoiseConfig::Diffusion { betas, num_train_timesteps } => {
                NoiseProcess::Diffusion(DiscreteVp::new(betas, num_train_timesteps)?)
            }
            NoiseConfig::Flow { shift } => NoiseProcess::Flow(RectifiedFlow { shift }),
        })
    }

    /// `(timestep embedding value, level)` for a uniform draw `u`: `t = ⌊u·T⌋` (diffusion),
    /// `t = u` embedded as 1000·t (flow).
    pub fn draw(&self, u: f32) -> Result<(f32, NoiseLevel<f32>)> {
        match self {
            NoiseProcess::Diffusion(s) => {
                let t = ((u * s.num_train_timesteps() as f32) as usize).min(s.num_train_timesteps() - 1);
                Ok((t as f32, s.level(t)?))
            }
            NoiseProcess::Flow(f) => Ok((1000.0 * u, f.level(u)?)),
        }
    }
}

/// `a_b·x + b_b·y` over a batch `[n, …]` with per-sample scalars `(a_b, b_b)`: the noised
/// sample (`α, σ` over `x₀, ε`) and every prediction target (ε, v, x₀, u) of a batch.
pub fn add_noise<B: Backend>(
    x0: &B::Tensor,
    eps: &B::Tensor,
    coefficients: impl Fn(&NoiseLevel<f32>) -> (f32, f32),
    levels: &[NoiseLevel<f32>],
) -> Result<B::Tensor> {
    let device = B::device(x0);
    let per_sample = |pick: &dyn Fn((f32, f32)) -> f32| {
        let values: Vec<f32> = levels.iter().map(|l| pick(coefficients(l))).collect();
        B::from_slice(&values, &Shape::new([levels.len(), 1, 1, 1]), DType::F32, &device)
    };
    let a = per_sample(&|c| c.0)?;
    let b = per_sample(&|c| c.1)?;
    Ok(B::add(&B::mul(x0, &a)?, &B::mul(eps, &b)?)?)
}
