//! Sampling from the controlled model: DDIM (η) and DDPM for diffusion, Euler for flow,
//! with control scale and classifier-free guidance over the prompt (null ids).

use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::schedule::DiscreteVp;
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, DualModel};
use crate::train::NoiseConfig;

/// The reverse process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Sampler {
    /// DDIM (Song et al. 2021) with stochasticity η (0: deterministic).
    Ddim {
        /// η ∈ [0, 1].
        eta: f32,
    },
    /// Ancestral DDPM-style sampling: DDIM with η = 1 on the strided schedule.
    Ddpm,
    /// Euler steps of the flow ODE `dx/dt = u` from t = 1 to 0 (rectified flow only).
    Euler,
}

/// What to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Reverse process.
    pub sampler: Sampler,
    /// Number of model evaluations (per guidance branch).
    pub steps: usize,
    /// Residual multiplier (1 = as trained).
    pub control_scale: f32,
    /// Classifier-free guidance `w`: `uncond + w·(cond − uncond)`, 1 = off.
    pub guidance_scale: f32,
    /// Seed of the initial noise and of stochastic steps.
    pub seed: u64,
    /// Clip the predicted x₀ to [−1, 1] at each diffusion step (pixel-space models).
    pub clip_sample: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: 25,
            control_scale: 1.0,
            guidance_scale: 1.0,
            seed: 0,
            clip_sample: true,
        }
    }
}

/// Samples `n` images for `hint [n, c_hint, r, r]` and per-embedding prompt ids.
pub fn sample<B: Backend>(
    model: &DualModel<B>,
    noise: &NoiseConfig,
    hint: &B::Tensor,
    prompts: &[Vec<usize>],
    cfg: &SampleConfig,
) -> Result<B::Tensor> {
    let n = B::shape(hint).dims().first().copied().unwrap_or(0);
    let u = &model.config.unet;
    if cfg.steps == 0 || n == 0 {
        return Err(TrainError::Config("sampling needs steps >= 1 and at least one condition".into()));
    }
    if !cfg.guidance_scale.is_finite() || !cfg.control_scale.is_finite() {
        return Err(TrainError::Config("guidance and control scales must be finite".into()));
    }
    let device = B::device(hint);
    let shape = Shape::new([n, u.image_channels, u.resolution, u.resolution]);
    let mut x = B::random_normal(&shape, cfg.seed, DType::F32, &device)?;
    let tape = Tape::<B>::new();
    let bound = model.store.bind(&tape);
    let hint_var = tape.constant(hint.clone());
    let null: Vec<Vec<usize>> = u.prompt_classes.iter().map(|&k| vec![k - 1; n]).collect();
    // The (guided) prediction at timestep value `t_embed`.
    let predict = |x: &B::Tensor, t_embed: f32| -> Result<B::Tensor> {
        tape.no_grad(|| {
            let eval = |ids: &[Vec<usize>]| -> Result<B::Tensor> {
                let cond = Conditioning { t: vec![t_embed; n], prompts: ids.to_vec() };
                Ok(model.predict(&bound, &tape.constant(x.clone()), &hint_var, &cond, cfg.control_scale)?.value)
            };
            let cond = eval(prompts)?;
            if cfg.guidance_scale == 1.0 {
                return Ok(cond);
            }
            let uncond = eval(&null)?;
            Ok(B::axpby(1.0 - cfg.guidance_scale, &uncond, cfg.guidance_scale, &cond)?)
        })
    };
    match (noise, cfg.sampler) {
        (NoiseConfig::Diffusion { betas, num_train_timesteps }, Sampler::Ddim { .. } | Sampler::Ddpm) => {
            let eta = match cfg.sampler {
                Sampler::Ddim { eta } if (0.0..=1.0).contains(&eta) => eta,
                Sampler::Ddim { eta } => {
                    return Err(TrainError::Config(format!("DDIM eta must lie in [0, 1], got {eta}")));
                }
                _ => 1.0,
            };
            let schedule = DiscreteVp::<f32>::new(*betas, *num_train_timesteps)?;
            let t_max = *num_train_timesteps;
            let ratio = (t_max / cfg.steps).max(1);
            // diffusers "leading" spacing: t = i·ratio for i = steps−1 … 0.
            let timesteps: Vec<usize> = (0..cfg.steps.min(t_max)).rev().map(|i| i * ratio).collect();
            for (k, &t) in timesteps.iter().enumerate() {
                let level = schedule.level(t)?;
                let a_t = schedule.alphas_cumprod()[t];
                let a_prev = timesteps.get(k + 1).map_or(1.0, |&tp| schedule.alphas_cumprod()[tp]);
                let pred = predict(&x, t as f32)?;
                let kind = u.prediction;
                let to_x0 = kind.to_sample(level)?;
                let mut x0 = B::axpby(to_x0.x_t, &x, to_x0.pred, &pred)?;
                if cfg.clip_sample {
                    let v: Vec<f32> = B::to_vec(&x0)?.into_iter().map(|v| v.clamp(-1.0, 1.0)).collect();
                    x0 = B::from_slice(&v, &shape, DType::F32, &device)?;
                }
                // ε consistent with the (clipped) x₀: ε = (x_t − α x₀)/σ.
                let eps = B::axpby(1.0 / level.sigma, &x, -level.alpha / level.sigma, &x0)?;
                let sigma = eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).max(0.0).sqrt();
                let dir = (1.0 - a_prev - sigma * sigma).max(0.0).sqrt();
                x = B::axpby(a_prev.sqrt(), &x0, dir, &eps)?;
                if sigma > 0.0 {
                    let z = B::random_normal(&shape, cfg.seed.wrapping_add(1 + k as u64), DType::F32, &device)?;
                    x = B::axpby(1.0, &x, sigma, &z)?;
                }
            }
            Ok(x)
        }
        (NoiseConfig::Flow { shift }, Sampler::Euler) => {
            let flow = lisa_core::schedule::RectifiedFlow { shift: *shift };
            let times: Vec<f32> = (0..=cfg.steps).map(|i| 1.0 - i as f32 / cfg.steps as f32).collect();
            for w in times.windows(2) {
                let (t, t_next) = (flow.shifted_time(w[0])?, flow.shifted_time(w[1])?);
                let u_pred = predict(&x, 1000.0 * w[0])?;
                x = B::axpby(1.0, &x, t_next - t, &u_pred)?;
            }
            Ok(x)
        }
        (noise, sampler) => Err(TrainError::Config(format!("sampler {sampler:?} does not apply to {noise:?}"))),
    }
}
