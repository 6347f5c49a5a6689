//! The training step (docs/method.md §3): noise a batch, run the dual-branch forward, take
//! `L = MSE(pred, y) + λ·LISA`, back-propagate into the side network and the decoder, clip,
//! AdamW, EMA. A baseline mode does everything the same without the decoder and the prior.

use std::path::Path;

use lisa_core::backend::Backend;
use lisa_core::loss_scale::LossScaleConfig;
use lisa_core::{LisaConfig, Prediction};
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::autodiff::VarId;
use crate::data::{Dataset, Example};
use crate::distributed::{DataParallel, Overlap};
use crate::error::{Result, TrainError};
use crate::model::{
    DECODER, DualDenoiser, ForwardOptions, ModelSpec, Parts, SIDE, SideMode, forward_train, registry, replay_side,
};
use crate::objective::{Objective, TauNorm, TauNormConfig, measure_tau_norm};
use crate::optim::{OptimConfig, Optimizer};
use crate::params::ParamId;
pub use crate::run::TrainState;
use crate::run::{MAX_BATCH, NoisedBatch, RunStream, StepSettings, TrainingRun, new_run_id};
use crate::scheduler::{NoiseConfig, NoiseProcess};
use crate::stream::{noise_draws, noise_shard};

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
    /// EMA decay of the side weights (None: off): the average diffusers' `EMAModel` keeps,
    /// updated after every optimizer step, checkpointed, used for validation and exported
    /// beside the trained side network.
    pub ema_decay: Option<f32>,
    /// Apply the LISA term to only the first N samples of each micro-batch (None: all, as
    /// in the paper). Cuts the prior pass and decoder cost by N/batch.
    pub lisa_subbatch: Option<usize>,
    /// The share of prompts replaced by the null prompt `""` during training (diffusers'
    /// `--proportion_empty_prompts`; 0).
    pub proportion_empty_prompts: f32,
    /// Recompute the side network's activations in the backward instead of holding them
    /// (diffusers' `--gradient_checkpointing`): less memory, one more side forward per step.
    pub gradient_checkpointing: bool,
    /// The LISA decoder's learning rate as a multiple of the side network's (1).
    pub decoder_lr_scale: f32,
    /// Divide `τ` by its root mean square at each timestep, measured on the prior before the
    /// first step, so the decoder's target has unit scale everywhere (None: off, the paper).
    pub normalize_tau: Option<TauNormConfig>,
    /// Dynamic loss scaling when the model autocasts to fp16 (torch `GradScaler`'s defaults:
    /// `init_log2 = 16`, `growth_interval = 2000`); unused otherwise.
    pub loss_scale: LossScaleConfig,
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
            proportion_empty_prompts: 0.0,
            gradient_checkpointing: false,
            decoder_lr_scale: 1.0,
            normalize_tau: None,
            loss_scale: LossScaleConfig::default(),
        }
    }
}

impl TrainConfig {
    /// Checks every value that needs no model (an error names the setting's run-file key,
    /// [`TrainError::Setting`]): what a program calls before it loads anything.
    pub fn validate_settings(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(TrainError::setting(format!("train.{key}"), reason));
        if self.lisa_subbatch == Some(0) {
            return bad("lisa_subbatch", "must be >= 1 (or unset)".into());
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return bad(
                "proportion_empty_prompts",
                format!("must lie in [0, 1], got {}", self.proportion_empty_prompts),
            );
        }
        for (key, value) in
            [("batch_size", self.batch_size), ("gradient_accumulation_steps", self.gradient_accumulation_steps)]
        {
            if !(1..=MAX_BATCH).contains(&value) {
                return bad(key, format!("must lie in 1..={MAX_BATCH}, got {value}"));
            }
        }
        self.lisa.validate().map_err(|e| TrainError::in_section("train.lisa", e))?;
        self.optim.validate("train.optim")?;
        if !(self.decoder_lr_scale > 0.0 && self.decoder_lr_scale.is_finite()) {
            return bad("decoder_lr_scale", format!("must be > 0 and finite, got {}", self.decoder_lr_scale));
        }
        if let Some(n) = &self.normalize_tau {
            n.validate()?;
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return bad("ema_decay", format!("must lie in [0, 1), got {d}"));
        }
        self.loss_scale.validate().map_err(|e| TrainError::in_section("train.loss_scale", e))?;
        Ok(())
    }

    /// Checks every value against the model it will train (its prediction type).
    pub fn validate(&self, prediction: Prediction) -> Result<()> {
        self.validate_settings()?;
        let flow = matches!(self.noise, NoiseConfig::Flow { .. });
        if flow != (prediction == Prediction::FlowVelocity) {
            let process = if flow { "a rectified flow" } else { "a diffusion schedule" };
            return Err(TrainError::setting(
                "train.noise",
                format!(
                    "the model predicts {prediction:?} but the noise process is {process}: flows need flow_velocity, diffusion models epsilon, v or sample"
                ),
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// The SHA-256 of these settings and `spec`'s identity (content, not paths): what every
    /// rank of a data-parallel run must share.
    pub fn digest_with(&self, spec: &ModelSpec) -> [u8; 32] {
        use sha2::Digest;
        let described = serde_json::json!({
            "config": serde_json::to_value(self).unwrap_or_default(),
            "model": spec.identity(),
        });
        sha2::Sha256::digest(described.to_string().as_bytes()).into()
    }
}

impl StepSettings for TrainConfig {
    fn optim(&self) -> &OptimConfig {
        &self.optim
    }
    fn total_steps(&self) -> u64 {
        self.max_train_steps
    }
    fn loss_scale(&self) -> LossScaleConfig {
        self.loss_scale
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
    /// The LISA distance a decoder that outputs zeros would have on the same samples (0 in
    /// baseline mode): `1 − lisa_loss / lisa_zero_distance` is the share of its target `τ`
    /// the decoder explains (for MSE, `lisa_zero_distance` is the weighted mean of `τ²`).
    #[serde(default)]
    pub lisa_zero_distance: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used.
    pub lr: f32,
    /// The loss scale the step's backward used (fp16 loss scaling; None without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
    /// The step was skipped: a gradient was inf or NaN under loss scaling, so no weight
    /// changed and the scale was halved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// The loss scale doubled after this step (`growth_interval` good steps in a row).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scale_grew: bool,
}

impl StepStats {
    pub(crate) fn new(step: u64, losses: (f32, f32, f32, f32), applied: crate::run::Applied) -> Self {
        let (loss, main_loss, lisa_loss, lisa_zero_distance) = losses;
        Self {
            step,
            loss,
            main_loss,
            lisa_loss,
            lisa_zero_distance,
            grad_norm: applied.grad_norm,
            lr: applied.lr,
            loss_scale: applied.loss_scale,
            skipped: applied.event == Some(lisa_core::loss_scale::ScaleEvent::Skipped),
            scale_grew: applied.event == Some(lisa_core::loss_scale::ScaleEvent::Grew),
        }
    }
}

/// A control-training run: model, optimizer state, EMA, data position, random stream.
pub type Trainer<B> = TrainingRun<B, TrainConfig>;

impl<B: Backend> Trainer<B> {
    /// A fresh run on `model` (built with the decoder iff `config.mode` is LISA).
    pub fn new(model: Box<dyn DualDenoiser<B>>, config: TrainConfig) -> Result<Self> {
        config.validate(model.prediction())?;
        if model.parts() != (Parts::Dual { decoder: config.mode == Mode::Lisa }) {
            return Err(TrainError::Config("build the dual model, with the decoder exactly when mode = lisa".into()));
        }
        let noise = NoiseProcess::new(&config.noise)?;
        let mut optimizer = Optimizer::new(model.store(), config.ema_decay, |n| n.starts_with(SIDE))?;
        if config.decoder_lr_scale != 1.0 {
            optimizer.adamw.scale_lr(model.store(), |n| n.starts_with(DECODER), config.decoder_lr_scale)?;
        }
        let run = RunStream::new(config.seed);
        Ok(Self { model, optimizer, run, run_id: new_run_id(), config, noise, tau_norm: None, parallel: None })
    }

    /// A fresh run from pretrained weights: `spec` built on `device` (with the decoder iff
    /// `config.mode` is LISA, seeded with `config.seed`), its main network loaded from `main`
    /// (a `lisa pretrain` prior, or a diffusers UNet folder) and, when given, its side network
    /// from `side` (the architecture's native format, e.g. a diffusers ControlNet folder).
    pub fn from_pretrained(
        spec: &ModelSpec,
        config: TrainConfig,
        main: &Path,
        side: Option<&Path>,
        device: B::Device,
    ) -> Result<Self> {
        let parts = Parts::Dual { decoder: config.mode == Mode::Lisa };
        let mut model = registry::build::<B>(spec, parts, device, config.seed)?;
        model.load_main(main)?;
        if let Some(side) = side {
            model.load_side(side)?;
        }
        Self::new(model, config)
    }

    /// Makes this run rank `parallel.rank()` of a data-parallel run (docs/distributed.md):
    /// from its next step it takes its rows of each global batch of `world × batch_size`
    /// examples and averages its gradients with the other ranks'. Every rank must be built
    /// the same way, with the same settings; [`session::run`](crate::session::run) checks
    /// that they agree before the first step.
    pub fn join(&mut self, parallel: DataParallel<B>) {
        self.parallel = Some(parallel);
    }

    /// Every rank holds the same settings, model and position (checked through the
    /// collective; nothing when the run trains alone). The weights are not compared: ranks
    /// built from the same files with the same seed hold the same ones.
    pub fn check_ranks_agree(&mut self) -> Result<()> {
        use sha2::Digest;
        let Some(parallel) = self.parallel.as_mut() else {
            return Ok(());
        };
        let state = self.run.state;
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.config.digest_with(&self.model.spec()));
        for v in [state.step, state.rng_counter, state.epoch, state.position as u64, state.skipped_steps] {
            hasher.update(v.to_le_bytes());
        }
        let digest = hasher.finalize();
        let fingerprint = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        parallel.agree(fingerprint, "the run's settings, model and position", self.model.store().device())
    }

    /// The run's per-timestep scale of `τ` (`normalize_tau`; None when off or in baseline
    /// mode), measured on `data` at the first call (the first step calls it): the same numbers
    /// for the same model, data and seed, so a resumed run measures what it measured before.
    pub fn tau_norm(&mut self, data: &dyn Dataset) -> Result<Option<&TauNorm>> {
        let Some(cfg) = self.config.normalize_tau.filter(|_| self.config.mode == Mode::Lisa) else {
            return Ok(None);
        };
        if self.tau_norm.is_none() {
            let examples = (0..cfg.examples.min(data.len())).map(|i| data.get(i)).collect::<Result<Vec<_>>>()?;
            let (model, lisa) = (self.model.as_ref(), &self.config.lisa);
            let norm =
                measure_tau_norm(model, lisa, &self.noise, &examples, &cfg, self.config.batch_size, self.config.seed)?;
            self.tau_norm = Some(norm);
        }
        Ok(self.tau_norm.as_ref())
    }

    /// The per-timestep scale of `τ` if [`Trainer::tau_norm`] has measured it.
    pub fn measured_tau_norm(&self) -> Option<&TauNorm> {
        self.tau_norm.as_ref()
    }

    /// One optimizer step over `gradient_accumulation_steps` micro-batches from `data`.
    pub fn step(&mut self, data: &dyn Dataset) -> Result<StepStats> {
        let accum = self.config.gradient_accumulation_steps;
        let mut grads: Vec<Option<B::Tensor>> = vec![None; self.optimizer.adamw.moments.len()];
        let (mut main_sum, mut lisa_sum, mut zero_sum, mut total_sum) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        let step = self.run.state.step + 1;
        self.tau_norm(data)?;
        self.run.state.ranks = self.shard().world as u64;
        let scaling = self.loss_scaler()?.map(|s| s.scale());
        let loss_scale = scaling.unwrap_or(1.0);
        // In a data-parallel step the last micro-batch's backward starts the gradients'
        // all-reduce bucket by bucket as it finishes them (not with gradient checkpointing,
        // whose replay finishes the side network's gradients after the backward).
        let overlap = self.parallel.is_some() && !self.config.gradient_checkpointing;
        let mut reduced = false;
        for k in 0..accum {
            let examples = self.next_examples(data, self.config.batch_size)?;
            let reduce = overlap && k + 1 == accum;
            let micro = self.micro_batch(&examples, accum, loss_scale, &mut grads, reduce).map_err(|e| e.at_step(step));
            let (main, lisa) = match micro {
                Ok(micro) => micro,
                // Under fp16 loss scaling a non-finite value in the forward (the losses refuse
                // them) skips the step, as torch's GradScaler would after an inf/NaN backward:
                // the step's remaining examples are consumed unused, the gradients dropped.
                Err(TrainError::NonFinite { .. }) if scaling.is_some() => {
                    // The stream advances as if the rest had run: every rank of a
                    // data-parallel run stays at the same position.
                    let global = self.config.batch_size * self.shard().world;
                    for _ in k + 1..accum {
                        self.next_examples(data, self.config.batch_size)?;
                        self.run.skip_draws(noise_draws(global, self.config.proportion_empty_prompts));
                    }
                    total_sum = f32::NAN;
                    grads.iter_mut().for_each(|g| *g = None);
                    break;
                }
                Err(e) => return Err(e),
            };
            reduced |= reduce;
            main_sum += main;
            lisa_sum += lisa.distance;
            zero_sum += lisa.zero_distance;
            total_sum += main + lisa.weighted;
        }
        if let Some(parallel) = &mut self.parallel {
            // The mean over every rank's micro-batches: gradients in buckets (unless the last
            // backward did it), then the losses (a rank's NaN makes every rank's loss NaN, so
            // all skip or stop together).
            if !reduced {
                let like = self.optimizer.adamw.slot_shapes();
                parallel.average_gradients(&mut grads, &like).map_err(|e| e.at_step(step))?;
            }
            let mut sums = [main_sum, lisa_sum, zero_sum, total_sum];
            parallel.average(&mut sums, self.model.store().device()).map_err(|e| e.at_step(step))?;
            [main_sum, lisa_sum, zero_sum, total_sum] = sums;
        }
        let loss = total_sum / accum as f32;
        // Under fp16 loss scaling an overflowing loss skips the step, as in torch; otherwise
        // it is an error.
        if !loss.is_finite() && scaling.is_none() {
            return Err(TrainError::NonFinite { what: "loss", step });
        }
        let applied = self.apply(&mut grads, loss.is_finite())?;
        let n = accum as f32;
        Ok(StepStats::new(step, (loss, main_sum / n, lisa_sum / n, zero_sum / n), applied))
    }

    /// The run's objective (its LISA settings, the model's prediction, `τ`'s scale).
    pub fn objective(&self) -> Objective<'_> {
        Objective {
            lisa: &self.config.lisa,
            prediction: self.model.prediction(),
            norm: self.tau_norm.as_ref(),
            noise: Some(&self.noise),
        }
    }

    /// Forward + backward of one micro-batch, its gradients added into `grads` (one slot per
    /// trainable parameter, in AdamW order) scaled by `loss_scale/accum`, so that the
    /// accumulated gradient is the mean over micro-batches (times the loss scale, 1 without
    /// fp16 loss scaling). With `reduce` (the last micro-batch of a data-parallel step), each
    /// slot goes to the all-reduce as soon as the backward finishes it, and `grads` ends as the
    /// average over the ranks.
    fn micro_batch(
        &mut self,
        examples: &[Example],
        accum: usize,
        loss_scale: f32,
        grads: &mut [Option<B::Tensor>],
        reduce: bool,
    ) -> Result<(f32, lisa_core::lisa::LisaLoss<f32>)> {
        let model = self.model.as_ref();
        let shard = self.shard();
        let p_empty = self.config.proportion_empty_prompts;
        let NoisedBatch { x_t, y, hint, levels, cond } =
            noise_shard::<B>(&mut self.run, &self.noise, model, true, examples, p_empty, None, shard)?;
        let hint = hint.ok_or(TrainError::Internal("noise_batch returns the hints it was asked for"))?;
        let tape = Tape::<B>::new();
        let bound = model.store().bind(&tape);
        let (x_var, hint_var) = (tape.constant(x_t.clone()), tape.constant(hint.clone()));
        let options = ForwardOptions {
            lisa: self.config.mode == Mode::Lisa,
            lisa_samples: self.config.lisa_subbatch.map(|k| k.min(examples.len())),
            side: if self.config.gradient_checkpointing { SideMode::Checkpointed } else { SideMode::Recorded },
        };
        let mut out = forward_train(model, &bound, &x_var, &hint_var, &cond, options)?;
        let loss = self.objective().loss(&out, &y, &levels, loss_scale / accum as f32)?;
        let mut roots = vec![(&out.pred, loss.grad_pred)];
        if let (Some(dec), Some(g)) = (&out.decoded, loss.grad_decoded) {
            roots.push((dec, g));
        }
        let leaves = bound.leaves();
        let add = |slot: &mut Option<B::Tensor>, g: B::Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                Some(a) => B::add(&a, &g)?,
                None => g,
            });
            Ok(())
        };
        if reduce {
            if out.side_leaves.is_some() {
                // The replay would finish side gradients after the buckets went out.
                return Err(TrainError::Internal("gradients reduced during a checkpointed backward"));
            }
            let slot_of: std::collections::HashMap<ParamId, usize> =
                self.optimizer.adamw.moments.iter().enumerate().map(|(i, (p, _, _))| (*p, i)).collect();
            let slot_of: std::collections::HashMap<VarId, usize> =
                leaves.iter().filter_map(|(p, v)| slot_of.get(p).map(|&i| (*v, i))).collect();
            let like = self.optimizer.adamw.slot_shapes();
            let parallel = self.parallel.as_mut().ok_or(TrainError::Internal("a reduce without ranks"))?;
            let mut overlap = Overlap::new(parallel, &like)?;
            let mut arrived = vec![false; grads.len()];
            tape.backward_each(&roots, |var, g| {
                let Some(&slot) = slot_of.get(&var) else { return Ok(()) };
                add(&mut grads[slot], g)?;
                arrived[slot] = true;
                overlap.ready(slot, grads[slot].take().ok_or(TrainError::Internal("a gradient just added"))?)
            })?;
            // Gradients of earlier micro-batches that this one's backward did not reach.
            for (slot, g) in grads.iter_mut().enumerate() {
                if let (false, Some(g)) = (arrived[slot], g.take()) {
                    overlap.ready(slot, g)?;
                }
            }
            overlap.finish(grads)?;
            return Ok((loss.main, loss.lisa));
        }
        let mut g = tape.backward(&roots)?;
        drop(roots);
        for (slot, extra) in grads.iter_mut().zip(self.optimizer.gather(leaves, &mut g)) {
            if let Some(extra) = extra {
                add(slot, extra)?;
            }
        }
        if let Some(side_leaves) = out.side_leaves.take() {
            // The side network again, recorded, seeded with its outputs' gradients.
            drop(out);
            let (leaves, mut g2) = replay_side(model, &side_leaves, &mut g, &x_t, &hint, &cond)?;
            for (slot, extra) in grads.iter_mut().zip(self.optimizer.gather(leaves, &mut g2)) {
                if let Some(extra) = extra {
                    add(slot, extra)?;
                }
            }
        }
        Ok((loss.main, loss.lisa))
    }
}
