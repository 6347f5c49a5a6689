//! Pretraining the main (prior) UNet on images + prompts, with prompt dropout for
//! classifier-free guidance and an EMA of the weights: the model LISA later keeps frozen.

use std::path::Path;

use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::checkpoint::{load_params, save_params};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::model::{UNet, UNetConfig};
use crate::optim::{AdamW, Ema, OptimConfig, clip_grad_norm};
use crate::params::ParamStore;
use crate::run::{NoiseProcess, NoisedBatch, RunStream, noise_batch};
use crate::train::{NoiseConfig, StepStats};

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

/// A pretraining run of the main UNet (parameters named `main.*`, all trainable).
pub struct Pretrainer<B: Backend> {
    /// The UNet's parameters.
    pub store: ParamStore<B>,
    /// The UNet.
    pub unet: UNet,
    /// AdamW moments.
    pub optim: AdamW<B>,
    /// EMA of every weight.
    pub ema: Option<Ema<B>>,
    /// Settings.
    pub config: PretrainConfig,
    /// Random stream and data position.
    pub run: RunStream,
    noise: NoiseProcess,
}

impl<B: Backend> Pretrainer<B> {
    /// A fresh run.
    pub fn new(unet: &UNetConfig, config: PretrainConfig, device: B::Device) -> Result<Self> {
        config.optim.validate()?;
        if config.batch_size == 0 || !(0.0..1.0).contains(&config.null_prompt_prob) {
            return Err(TrainError::Config("pretrain: batch_size >= 1 and null_prompt_prob in [0, 1) required".into()));
        }
        let mut store = ParamStore::new(device, config.seed);
        let net = UNet::new(&mut store, "main", unet, true)?;
        let optim = AdamW::new(&store)?;
        let ema = config.ema_decay.map(|d| Ema::new(&store, d, |_| true)).transpose()?;
        Ok(Self {
            noise: NoiseProcess::new(&config.noise)?,
            run: RunStream::new(config.seed),
            store,
            unet: net,
            optim,
            ema,
            config,
        })
    }

    /// One step: `L = MSE(M(x_t, t, c_txt), y)` over a batch from `data`.
    pub fn step(&mut self, data: &dyn Dataset) -> Result<StepStats> {
        let step = self.run.state.step + 1;
        let idx = self.run.next_indices(data.len(), self.config.batch_size)?;
        let examples = idx.iter().map(|&i| data.get(i)).collect::<Result<Vec<_>>>()?;
        let device = self.store.device().clone();
        let NoisedBatch { x_t, y, cond, .. } = noise_batch::<B>(
            &mut self.run,
            &self.noise,
            &self.unet.config,
            None,
            &examples,
            self.config.null_prompt_prob,
            &device,
        )?;
        let tape = Tape::<B>::new();
        let bound = self.store.bind(&tape);
        let pred = self.unet.forward(&bound, &tape.constant(x_t), &cond)?;
        let (loss, g) = B::mse_loss(&pred.value, &y)?;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { what: "loss", step });
        }
        let leaves: std::collections::HashMap<_, _> = bound.leaves().into_iter().collect();
        let mut grads_by_leaf = tape.backward(&[(&pred, g)])?;
        let mut grads: Vec<Option<B::Tensor>> = self
            .optim
            .moments
            .iter()
            .map(|(pid, _, _)| leaves.get(pid).and_then(|v| grads_by_leaf.remove(*v)))
            .collect();
        let grad_norm = clip_grad_norm::<B>(&mut grads, self.config.optim.max_grad_norm, step)?;
        let lr = self.config.optim.lr_at(self.run.state.step, self.config.max_train_steps);
        self.optim.update(&mut self.store, &grads, lr, &self.config.optim)?;
        if let Some(e) = &mut self.ema {
            e.update(&self.store, step)?;
        }
        self.run.state.step = step;
        Ok(StepStats { step, loss, main_loss: loss, lisa_loss: 0.0, grad_norm, lr })
    }

    /// Writes the main model (the EMA weights when EMA is on) as safetensors, names `main.*`:
    /// the file [`crate::model::DualModel::load_main`] reads.
    pub fn export(&self, path: &Path) -> Result<()> {
        let mut store = self.store.clone();
        if let Some(e) = &self.ema {
            for (id, shadow) in &e.shadow {
                store.get_mut(*id).value = shadow.clone();
            }
        }
        save_params(&store, path, |_| true, |n| n.to_string())
    }

    /// Loads main-model weights (e.g. to continue pretraining or to evaluate).
    pub fn load(&mut self, path: &Path) -> Result<usize> {
        load_params(&mut self.store, path, |_| true, |n| n.to_string())
    }
}
