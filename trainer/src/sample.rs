//! Sampling from the controlled model with any [`Scheduler`](crate::scheduler::Scheduler), with control scale and
//! classifier-free guidance over the prompt (the empty prompt is the unconditional one).

use lisa_core::backend::{Backend, DType, Shape};
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, DualDenoiser, predict};
pub use crate::scheduler::Sampler;
use crate::scheduler::{NoiseConfig, SchedulerConfig, Spacing, build};

/// What to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Reverse process.
    pub sampler: Sampler,
    /// Number of model evaluations (per guidance branch).
    pub steps: usize,
    /// Timestep spacing of DDIM/DDPM (None: leading); flows step uniformly in `t`.
    pub spacing: Option<Spacing>,
    /// Residual multiplier (1 = as trained).
    pub control_scale: f32,
    /// Classifier-free guidance `w`: `uncond + w·(cond − uncond)`, 1 = off.
    pub guidance_scale: f32,
    /// Seed of the initial noise and of stochastic steps.
    pub seed: u64,
    /// Clip the predicted x₀ to [−1, 1] at each diffusion step (pixel-space models).
    pub clip_sample: bool,
    /// Under classifier-free guidance the unconditional branch reads zeros in place of the
    /// empty prompt's embedding (and pooled text): diffusers' `force_zeros_for_empty_prompt`,
    /// on in SDXL pipelines.
    pub zero_null_prompt: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: 25,
            spacing: None,
            control_scale: 1.0,
            guidance_scale: 1.0,
            seed: 0,
            clip_sample: true,
            zero_null_prompt: false,
        }
    }
}

impl SampleConfig {
    /// Checks what the scheduler does not: finite control and guidance scales (steps and η are
    /// checked when [`crate::scheduler::build`] makes the scheduler).
    pub fn validate(&self) -> Result<()> {
        if !self.guidance_scale.is_finite() || !self.control_scale.is_finite() {
            return Err(TrainError::Config(format!(
                "guidance and control scales must be finite, got {} and {}",
                self.guidance_scale, self.control_scale
            )));
        }
        Ok(())
    }

    /// The scheduler settings for a model predicting `prediction`.
    pub fn scheduler(&self, prediction: lisa_core::Prediction) -> SchedulerConfig {
        SchedulerConfig {
            sampler: self.sampler,
            steps: self.steps,
            spacing: self.spacing,
            prediction,
            clip_sample: self.clip_sample,
            seed: self.seed,
        }
    }
}

/// Samples `n` images for `hint [n, c_hint, h, w]` and one prompt per image, with the
/// model's noise process `noise`.
pub fn sample<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    hint: &B::Tensor,
    prompts: &[&str],
    cfg: &SampleConfig,
) -> Result<B::Tensor> {
    cfg.validate()?;
    let n = B::shape(hint).dims().first().copied().unwrap_or(0);
    if n == 0 || prompts.len() != n {
        return Err(TrainError::Mismatch(format!(
            "sampling needs one prompt per condition image: {} prompts for {n} images",
            prompts.len()
        )));
    }
    let prompt = model.embed_prompts(prompts)?;
    let null = match cfg.zero_null_prompt {
        true => zeros_like(&prompt),
        false => model.embed_prompts(&vec![""; n])?,
    };
    sample_embedded(model, noise, hint, &prompt, &null, cfg)
}

/// An embedding of `like`'s shape holding zeros (class ids kept: they have no zero).
fn zeros_like(like: &crate::model::PromptEmbedding) -> crate::model::PromptEmbedding {
    use crate::model::PromptEmbedding as P;
    match like {
        P::Text { values, tokens, dim } => P::Text { values: vec![0.0; values.len()], tokens: *tokens, dim: *dim },
        P::TextPooled { values, tokens, dim, pooled, pooled_dim } => P::TextPooled {
            values: vec![0.0; values.len()],
            tokens: *tokens,
            dim: *dim,
            pooled: vec![0.0; pooled.len()],
            pooled_dim: *pooled_dim,
        },
        other => other.clone(),
    }
}

/// [`sample`] with the prompts already embedded (`prompt`; `null`, the empty prompt's, read
/// only under classifier-free guidance): for programs that bring their own text encoder.
pub fn sample_embedded<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    hint: &B::Tensor,
    prompt: &crate::model::PromptEmbedding,
    null: &crate::model::PromptEmbedding,
    cfg: &SampleConfig,
) -> Result<B::Tensor> {
    cfg.validate()?;
    let n = B::shape(hint).dims().first().copied().unwrap_or(0);
    for (what, e) in [("prompt", prompt), ("null prompt", null)] {
        let batch = e.batch().unwrap_or(n);
        if n == 0 || batch != n {
            return Err(TrainError::Mismatch(format!(
                "sampling {n} condition images with {batch} {what} embeddings: one per image needed"
            )));
        }
    }
    let scheduler = build::<B>(noise, &cfg.scheduler(model.prediction()))?;
    let device = B::device(hint);
    let [c, h, w] = model.sample_shape();
    let mut x = B::random_normal(&Shape::new([n, c, h, w]), cfg.seed, DType::F32, &device)?;
    let tape = Tape::<B>::new();
    let bound = model.store().bind(&tape);
    let hint_var = tape.constant(hint.clone());
    // The (guided) prediction at timestep value `t`.
    let guided = |x: &B::Tensor, t: f32| -> Result<B::Tensor> {
        tape.no_grad(|| {
            let eval = |prompt: &crate::model::PromptEmbedding| -> Result<B::Tensor> {
                let cond = Conditioning { t: vec![t; n], prompt: prompt.clone() };
                Ok(predict(model, &bound, &tape.constant(x.clone()), &hint_var, &cond, cfg.control_scale)?.value)
            };
            let cond = eval(prompt)?;
            if cfg.guidance_scale == 1.0 {
                return Ok(cond);
            }
            let uncond = eval(null)?;
            Ok(B::axpby(1.0 - cfg.guidance_scale, &uncond, cfg.guidance_scale, &cond)?)
        })
    };
    for (k, &t) in scheduler.timesteps().iter().enumerate() {
        let pred = guided(&x, t)?;
        x = scheduler.step(k, &pred, &x)?;
    }
    Ok(x)
}
