//! Pretraining the main (prior) UNet on images + prompts, with prompt dropout for
//! classifier-free guidance and an EMA of the weights: the model LISA later keeps frozen.

use std::path::Path;

use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::model::{ModelSpec, Parts, forward_prior, registry};
use crate::optim::{OptimConfig, Optimizer};
use crate::run::{MAX_BATCH, NoisedBatch, RunStream, StepSettings, TrainingRun, new_run_id, noise_batch};
use crate::scheduler::{NoiseConfig, NoiseProcess};
use crate::train::StepStats;
use crate::weights::{MODEL_SPEC_KEY, load_params, save_params};

/// Pretraining settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Seeds weights, data order, timesteps, noise and prompt dropout.
    pub seed: u64,
    /// Examples per step.
    pub batch_size: usize,
    /// Steps of the run (cosine schedule length).
    pub max_train_steps: u64,
    /// AdamW and the lr schedule.
    pub optim: OptimConfig,
    /// Noising process.
    pub noise: NoiseConfig,
    /// Probability of replacing a sample's prompt by the null ids (0.1).
    pub null_prompt_prob: f32,
    /// EMA decay of the weights (0.999); the EMA weights are what gets exported.
    pub ema_decay: Option<f32>,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            batch_size: 32,
            max_train_steps: 2000,
            optim: OptimConfig { lr: 1e-3, weight_decay: 0.0, ..OptimConfig::default() },
            noise: NoiseConfig::default(),
            null_prompt_prob: 0.1,
            ema_decay: Some(0.999),
        }
    }
}

impl StepSettings for PretrainConfig {
    fn optim(&self) -> &OptimConfig {
        &self.optim
    }
    fn total_steps(&self) -> u64 {
        self.max_train_steps
    }
}

impl PretrainConfig {
    /// Checks every value (an error names the setting's run-file key, [`TrainError::Setting`]).
    pub fn validate(&self) -> Result<()> {
        self.optim.validate("pretrain.optim")?;
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            let reason = format!("must lie in 1..={MAX_BATCH}, got {}", self.batch_size);
            return Err(TrainError::setting("pretrain.batch_size", reason));
        }
        if !(0.0..1.0).contains(&self.null_prompt_prob) {
            let reason = format!("must lie in [0, 1), got {}", self.null_prompt_prob);
            return Err(TrainError::setting("pretrain.null_prompt_prob", reason));
        }
        Ok(())
    }
}

/// A pretraining run of the main network (parameters named `main.*`, all trainable, built
/// with [`Parts::Prior`]; the optimizer keeps an EMA of every weight).
pub type Pretrainer<B> = TrainingRun<B, PretrainConfig>;

impl<B: Backend> Pretrainer<B> {
    /// A fresh run of the main network of `spec`.
    pub fn new(spec: &ModelSpec, config: PretrainConfig, device: B::Device) -> Result<Self> {
        config.validate()?;
        let model = registry::build::<B>(spec, Parts::Prior, device, config.seed)?;
        let optimizer = Optimizer::new(model.store(), config.ema_decay, |_| true)?;
        Ok(Self {
            noise: NoiseProcess::new(&config.noise)?,
            run: RunStream::new(config.seed),
            run_id: new_run_id(),
            tau_norm: None,
            parallel: None,
            model,
            optimizer,
            config,
        })
    }

    /// One step: `L = MSE(M(x_t, t, c_txt), y)` over a batch from `data`.
    pub fn step(&mut self, data: &dyn Dataset) -> Result<StepStats> {
        let step = self.run.state.step + 1;
        let examples = self.next_examples(data, self.config.batch_size)?;
        let model = self.model.as_ref();
        let NoisedBatch { x_t, y, cond, .. } =
            noise_batch::<B>(&mut self.run, &self.noise, model, false, &examples, self.config.null_prompt_prob)?;
        let tape = Tape::<B>::new();
        let bound = model.store().bind(&tape);
        let pred = forward_prior(model, &bound, &tape.constant(x_t), &cond).map_err(|e| e.at_step(step))?;
        let (loss, g) = B::mse_loss(&pred.value, &y).map_err(|e| TrainError::from(e).at_step(step))?;
        let scaler = self.loss_scaler()?;
        if !loss.is_finite() && scaler.is_none() {
            return Err(TrainError::NonFinite { what: "loss", step });
        }
        // fp16 loss scaling, when the model autocasts to fp16 ([`TrainingRun::apply`]).
        let g = match scaler {
            Some(s) => B::scale(&g, s.scale()).map_err(TrainError::from)?,
            None => g,
        };
        let leaves = bound.leaves();
        let mut grads_by_leaf = tape.backward(&[(&pred, g)])?;
        let mut grads = self.optimizer.gather(leaves, &mut grads_by_leaf);
        let applied = self.apply(&mut grads, loss.is_finite())?;
        Ok(StepStats::new(step, (loss, loss, 0.0, 0.0), applied))
    }

    /// Writes the main model (the EMA weights when EMA is on) as safetensors, names `main.*`,
    /// with the model's description in the metadata: the file
    /// [`crate::model::DualDenoiser::load_main`] reads.
    pub fn export(&self, path: &Path) -> Result<()> {
        let mut store = self.model.store().clone();
        if let Some(e) = &self.optimizer.ema {
            for (id, shadow) in &e.shadow {
                store.get_mut(*id).value = shadow.clone();
            }
        }
        let spec = serde_json::to_string(&self.model.spec()).map_err(|e| TrainError::Serialize(e.to_string()))?;
        save_params(&store, path, |_| true, [(MODEL_SPEC_KEY.to_string(), spec)].into()).map(|_| ())
    }

    /// Loads main-model weights (e.g. to continue pretraining or to evaluate).
    pub fn load(&mut self, path: &Path) -> Result<usize> {
        load_params(self.model.store_mut(), path, |_| true, |_| false)
    }
}
