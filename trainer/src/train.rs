//! The training step (lisa-method.md §3): noise a batch, run the dual-branch forward, take
//! `L = MSE(pred, y) + λ·LISA`, back-propagate into the side network and the decoder, clip,
//! AdamW, EMA. A baseline mode does everything the same without the decoder and the prior.

use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::lisa::SampleTerms;
use lisa_core::rng::{philox4x32_10, uniform_open};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use lisa_core::{LisaConfig, NoiseLevel, Prediction};
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::data::{Dataset, Example};
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, DualModel, ModelConfig};
use crate::optim::{AdamW, Ema, OptimConfig, clip_grad_norm};

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
        NoiseConfig::Diffusion {
            betas: BetaSchedule::DDPM_LINEAR,
            num_train_timesteps: 1000,
        }
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
            return Err(TrainError::Config(
                "lisa_subbatch must be >= 1 (or unset)".into(),
            ));
        }
        if self.batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return Err(TrainError::Config(
                "batch_size and gradient_accumulation_steps must be >= 1".into(),
            ));
        }
        self.lisa
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
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

/// Where a run is: everything besides weights and moments that resuming needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Counter of the run's random stream (each draw consumes one value).
    pub rng_counter: u64,
    /// Data epoch.
    pub epoch: u64,
    /// Position inside the epoch's permutation.
    pub position: usize,
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
type MicroBatch<B> = (
    f32,
    lisa_core::lisa::LisaLoss<f32>,
    Vec<Option<<B as lisa_core::backend::BackendTypes>::Tensor>>,
);

enum Noise {
    Diffusion(DiscreteVp<f32>),
    Flow(RectifiedFlow),
}

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
    /// Position of the run.
    pub state: TrainState,
    noise: Noise,
    permutation: (u64, Vec<usize>),
}

impl<B: Backend> Trainer<B> {
    /// A fresh run on `model` (built with the decoder iff `config.mode` is LISA).
    pub fn new(model: DualModel<B>, config: TrainConfig) -> Result<Self> {
        config.validate(&model.config)?;
        if (config.mode == Mode::Lisa) != model.decoder.is_some() {
            return Err(TrainError::Config(
                "build the model with the decoder exactly when mode = lisa".into(),
            ));
        }
        let noise = match config.noise {
            NoiseConfig::Diffusion {
                betas,
                num_train_timesteps,
            } => Noise::Diffusion(DiscreteVp::new(betas, num_train_timesteps)?),
            NoiseConfig::Flow { shift } => Noise::Flow(RectifiedFlow { shift }),
        };
        let optim = AdamW::new(&model.store)?;
        let ema = config
            .ema_decay
            .map(|d| Ema::new(&model.store, d, |n| n.starts_with("side.")))
            .transpose()?;
        Ok(Self {
            model,
            optim,
            ema,
            config,
            state: TrainState::default(),
            noise,
            permutation: (u64::MAX, Vec::new()),
        })
    }

    fn next_seed(&mut self) -> u64 {
        let c = self.state.rng_counter;
        self.state.rng_counter += 1;
        let r = philox4x32_10(
            [c as u32, (c >> 32) as u32, 0x5eed, 0],
            [self.config.seed as u32, (self.config.seed >> 32) as u32],
        );
        (r[0] as u64) << 32 | r[1] as u64
    }

    fn uniforms(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| uniform_open(self.next_seed() as u32))
            .collect()
    }

    /// The next `n` example indices (a seeded permutation per epoch).
    fn next_indices(&mut self, data_len: usize, n: usize) -> Result<Vec<usize>> {
        if data_len == 0 {
            return Err(TrainError::Config("the dataset is empty".into()));
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.permutation.0 != self.state.epoch || self.permutation.1.len() != data_len {
                let mut p: Vec<usize> = (0..data_len).collect();
                for i in (1..data_len).rev() {
                    let r = philox4x32_10(
                        [i as u32, self.state.epoch as u32, 0xda7a, 0],
                        [self.config.seed as u32, (self.config.seed >> 32) as u32],
                    );
                    p.swap(i, (r[0] as usize) % (i + 1));
                }
                self.permutation = (self.state.epoch, p);
            }
            out.push(self.permutation.1[self.state.position]);
            self.state.position += 1;
            if self.state.position == data_len {
                self.state.position = 0;
                self.state.epoch += 1;
            }
        }
        Ok(out)
    }

    /// One optimizer step over `gradient_accumulation_steps` micro-batches from `data`.
    pub fn step(&mut self, data: &dyn Dataset) -> Result<StepStats> {
        let accum = self.config.gradient_accumulation_steps;
        let n_trainable = self.optim.moments.len();
        let mut grads: Vec<Option<B::Tensor>> = vec![None; n_trainable];
        let (mut main_sum, mut lisa_sum, mut total_sum) = (0.0f32, 0.0f32, 0.0f32);
        let step = self.state.step + 1;
        for _ in 0..accum {
            let idx = self.next_indices(data.len(), self.config.batch_size)?;
            let examples = idx
                .iter()
                .map(|&i| data.get(i))
                .collect::<Result<Vec<_>>>()?;
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
        let lr = self
            .config
            .optim
            .lr_at(self.state.step, self.config.max_train_steps);
        self.optim
            .update(&mut self.model.store, &grads, lr, &self.config.optim)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.model.store)?;
        }
        self.state.step = step;
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
        let u = self.model.config.unet.clone();
        let (c, r) = (u.image_channels, u.resolution);
        let hint_c = self.model.config.control.hint_channels;
        let device = self.model.store.device().clone();
        let mut image = Vec::with_capacity(n * c * r * r);
        let mut hint = Vec::with_capacity(n * hint_c * r * r);
        for e in examples {
            if e.image.len() != c * r * r || e.hint.len() != hint_c * r * r {
                return Err(TrainError::Config(format!(
                    "example does not match the model: image {} values (want {}), hint {} (want {})",
                    e.image.len(),
                    c * r * r,
                    e.hint.len(),
                    hint_c * r * r
                )));
            }
            image.extend_from_slice(&e.image);
            hint.extend_from_slice(&e.hint);
        }
        let prompts: Vec<Vec<usize>> = (0..u.prompt_classes.len())
            .map(|k| {
                examples
                    .iter()
                    .map(|e| e.prompt.get(k).copied().unwrap_or(u.prompt_classes[k] - 1))
                    .collect()
            })
            .collect();
        // Timesteps, levels, per-sample LISA terms.
        let uniforms = self.uniforms(n);
        let mut t_embed = Vec::with_capacity(n);
        let mut levels: Vec<NoiseLevel<f32>> = Vec::with_capacity(n);
        for &v in &uniforms {
            match &self.noise {
                Noise::Diffusion(s) => {
                    let t = ((v * s.num_train_timesteps() as f32) as usize)
                        .min(s.num_train_timesteps() - 1);
                    t_embed.push(t as f32);
                    levels.push(s.level(t)?);
                }
                Noise::Flow(f) => {
                    t_embed.push(1000.0 * v);
                    levels.push(f.level(v)?);
                }
            }
        }
        let prediction = u.prediction;
        let x0 = B::from_slice(&image, &Shape::new([n, c, r, r]), DType::F32, &device)?;
        let hint = B::from_slice(&hint, &Shape::new([n, hint_c, r, r]), DType::F32, &device)?;
        let eps = B::random_normal(
            &Shape::new([n, c, r, r]),
            self.next_seed(),
            DType::F32,
            &device,
        )?;
        let per_sample = |f: &dyn Fn(&NoiseLevel<f32>) -> f32| {
            B::from_slice(
                &levels.iter().map(f).collect::<Vec<_>>(),
                &Shape::new([n, 1, 1, 1]),
                DType::F32,
                &device,
            )
        };
        let x_t = B::add(
            &B::mul(&x0, &per_sample(&|l| l.alpha)?)?,
            &B::mul(&eps, &per_sample(&|l| l.sigma)?)?,
        )?;
        let y = B::add(
            &B::mul(&x0, &per_sample(&|l| prediction.coefficients(*l).0)?)?,
            &B::mul(&eps, &per_sample(&|l| prediction.coefficients(*l).1)?)?,
        )?;
        let cond = Conditioning {
            t: t_embed,
            prompts,
        };

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
        let mut lisa = lisa_core::lisa::LisaLoss {
            weighted: 0.0,
            distance: 0.0,
        };
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
        let grads = self
            .optim
            .moments
            .iter()
            .map(|(pid, _, _)| by_param.get(pid).and_then(|vid| g.remove(*vid)))
            .collect();
        Ok((main, lisa, grads))
    }
}
