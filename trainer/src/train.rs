//! The training step (lisa-method.md §3): noise a batch, run the dual-branch forward, take
//! `L = MSE(pred, y) + λ·LISA`, back-propagate into the side network and the decoder, clip,
//! AdamW, EMA. A baseline mode does everything the same without the decoder and the prior.

use lisa_core::backend::{Backend, Shape};
use lisa_core::lisa::SampleTerms;
use lisa_core::schedule::BetaSchedule;
use lisa_core::{LisaConfig, Prediction};
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::data::{Dataset, Example};
use crate::error::{Result, TrainError};
use crate::model::{DualModel, ModelConfig};
use crate::optim::{AdamW, Ema, OptimConfig, clip_grad_norm};
pub use crate::run::TrainState;
use crate::run::{NoiseProcess, NoisedBatch, RunStream, noise_batch};

/// LISA or the plain ControlNet baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Diffusion loss + λ·LISA loss (decoder built, prior pass run).
    #[default]
    Lisa,
    /// Diffusion loss only: no decoder, no prior pass; everything else identical.
    Baseline,
}

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

/// Everything that configures a control-training run (defaults: the reference toy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds weights, data order, timesteps and noise.
    pub seed: u64,
    /// Examples per micro-batch (32).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps of the run (for the cosine schedule).
    pub max_train_steps: u64,
    /// LISA or baseline.
    pub mode: Mode,
    /// λ, target space, distance, weighting.
    pub lisa: LisaConfig,
    /// AdamW and the lr schedule.
    pub optim: OptimConfig,
    /// Noising process.
    pub noise: NoiseConfig,
    /// EMA decay of the side weights (None: off).
    pub ema_decay: Option<f32>,
    /// Apply the LISA term to only the first N samples of each micro-batch (None: all, as
    /// in the paper). Cuts the prior pass and decoder cost by N/batch.
    pub lisa_subbatch: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            batch_size: 32,
            gradient_accumulation_steps: 1,
            max_train_steps: 1000,
            mode: Mode::Lisa,
            lisa: LisaConfig::default(),
            optim: OptimConfig::default(),
            noise: NoiseConfig::default(),
            ema_decay: None,
            lisa_subbatch: None,
        }
    }
}

impl TrainConfig {
    /// Checks every value against the model it will train.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.lisa_subbatch == Some(0) {
            return Err(TrainError::Config("lisa_subbatch must be >= 1 (or unset)".into()));
        }
        if self.batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config("batch_size and gradient_accumulation_steps must be >= 1".into()));
        }
        self.lisa.validate().map_err(|e| TrainError::Config(e.to_string()))?;
        self.optim.validate()?;
        let flow = matches!(self.noise, NoiseConfig::Flow { .. });
        if flow != (model.unet.prediction == Prediction::FlowVelocity) {
            return Err(TrainError::Config(format!(
                "prediction {:?} does not match the noise process {:?}",
                model.unet.prediction, self.noise
            )));
        }
        Ok(())
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The step just completed (1-based).
    pub step: u64,
    /// `main + λ·lisa` (mean over micro-batches).
    pub loss: f32,
    /// Diffusion MSE.
    pub main_loss: f32,
    /// LISA distance before λ (0 in baseline mode).
    pub lisa_loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
}

/// `(main loss, LISA term, per-parameter gradients)` of one micro-batch.
type MicroBatch<B> =
    (f32, lisa_core::lisa::LisaLoss<f32>, Vec<Option<<B as lisa_core::backend::BackendTypes>::Tensor>>);

/// A control-training run: model, optimizer state, EMA, data position, random stream.
pub struct Trainer<B: Backend> {
    /// The dual-branch model.
    pub model: DualModel<B>,
    /// AdamW moments.
    pub optim: AdamW<B>,
    /// EMA of the side weights.
    pub ema: Option<Ema<B>>,
    /// The run's configuration.
    pub config: TrainConfig,
    /// Random stream, data order and step: the resumable position of the run.
    pub run: RunStream,
    noise: NoiseProcess,
}

impl<B: Backend> Trainer<B> {
    /// A fresh run on `model` (built with the decoder iff `config.mode` is LISA).
    pub fn new(model: DualModel<B>, config: TrainConfig) -> Result<Self> {
        config.validate(&model.config)?;
        if (config.mode == Mode::Lisa) != model.decoder.is_some() {
            return Err(TrainError::Config("build the model with the decoder exactly when mode = lisa".into()));
        }
        let noise = NoiseProcess::new(&config.noise)?;
        let optim = AdamW::new(&model.store)?;
        let ema = config.ema_decay.map(|d| Ema::new(&model.store, d, |n| n.starts_with("side."))).transpose()?;
        Ok(Self { model, optim, ema, run: RunStream::new(config.seed), config, noise })
    }

    /// One optimizer step over `gradient_accumulation_steps` micro-batches from `data`.
    pub fn step(&mut self, data: &dyn Dataset) -> Result<StepStats> {
        let accum = self.config.gradient_accumulation_steps;
        let n_trainable = self.optim.moments.len();
        let mut grads: Vec<Option<B::Tensor>> = vec![None; n_trainable];
        let (mut main_sum, mut lisa_sum, mut total_sum) = (0.0f32, 0.0f32, 0.0f32);
        let step = self.run.state.step + 1;
        for _ in 0..accum {
            let idx = self.run.next_indices(data.len(), self.config.batch_size)?;
            let examples = idx.iter().map(|&i| data.get(i)).collect::<Result<Vec<_>>>()?;
            let (main, lisa, micro) = self.micro_batch(&examples, accum)?;
            main_sum += main;
            lisa_sum += lisa.distance;
            total_sum += main + lisa.weighted;
            for (slot, g) in grads.iter_mut().zip(micro) {
                *slot = match (slot.take(), g) {
                    (Some(a), Some(b)) => Some(B::add(&a, &b)?),
                    (a, b) => a.or(b),
                };
            }
        }
        let loss = total_sum / accum as f32;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { what: "loss", step });
        }
        let grad_norm = clip_grad_norm::<B>(&mut grads, self.config.optim.max_grad_norm, step)?;
        let lr = self.config.optim.lr_at(self.run.state.step, self.config.max_train_steps);
        self.optim.update(&mut self.model.store, &grads, lr, &self.config.optim)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model.store, step)?;
        }
        self.run.state.step = step;
        Ok(StepStats {
            step,
            loss,
            main_loss: main_sum / accum as f32,
            lisa_loss: lisa_sum / accum as f32,
            grad_norm,
            lr,
        })
    }

    /// Forward + backward of one micro-batch; gradients are scaled by `1/accum` so that the
    /// accumulated gradient is the mean over micro-batches.
    fn micro_batch(&mut self, examples: &[Example], accum: usize) -> Result<MicroBatch<B>> {
        let n = examples.len();
        let u = &self.model.config.unet;
        let (c, r, prediction) = (u.image_channels, u.resolution, u.prediction);
        let device = self.model.store.device().clone();
        let hint_channels = self.model.config.control.hint_channels;
        let NoisedBatch { x_t, y, hint, levels, cond } =
            noise_batch::<B>(&mut self.run, &self.noise, u, Some(hint_channels), examples, 0.0, &device)?;
        let hint = hint.ok_or(TrainError::Autodiff("noise_batch returns the hints it was asked for"))?;
        let lisa_on = self.config.mode == Mode::Lisa;
        let tape = Tape::<B>::new();
        let bound = self.model.store.bind(&tape);
        let out = self.model.forward_train(
            &bound,
            &tape.constant(x_t),
            &tape.constant(hint),
            &cond,
            lisa_on,
            self.config.lisa_subbatch.map(|k| k.min(n)),
        )?;
        let inv = 1.0 / accum as f32;
        let (main, g_pred) = B::mse_loss(&out.pred.value, &y)?;
        let mut roots = vec![(&out.pred, B::scale(&g_pred, inv)?)];
        let mut lisa = lisa_core::lisa::LisaLoss { weighted: 0.0, distance: 0.0 };
        if let (Some(dec), Some(prior)) = (&out.decoded, &out.prior) {
            // The LISA samples are the first k of the batch (all of it unless sub-batched).
            let k = B::shape(&dec.value).dims()[0];
            let terms = levels[..k]
                .iter()
                .map(|&l| self.config.lisa.sample_terms(prediction, l))
                .collect::<lisa_core::Result<Vec<SampleTerms<f32>>>>()?;
            let y_k = if k == n {
                y.clone()
            } else {
                let flat = B::reshape(&y, &Shape::new([1, n, c * r * r]))?;
                B::reshape(&B::slice_channels(&flat, 0, k)?, &Shape::new([k, c, r, r]))?
            };
            let (l, g_dec) = B::lisa_loss(&self.config.lisa, &terms, &dec.value, &y_k, prior)?;
            lisa = l;
            roots.push((dec, B::scale(&g_dec, inv)?));
        }
        let leaves = bound.leaves();
        let mut g = tape.backward(&roots)?;
        // Gradients in AdamW order (store order of trainable parameters).
        let by_param: std::collections::HashMap<_, _> = leaves.into_iter().collect();
        let grads =
            self.optim.moments.iter().map(|(pid, _, _)| by_param.get(pid).and_then(|vid| g.remove(*vid))).collect();
        Ok((main, lisa, grads))
    }
}
