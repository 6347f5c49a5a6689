//! What every training run shares: the model, its optimizer and settings, the random
//! stream with the data position ([`crate::stream`]), and the optimizer step.

use lisa_core::backend::Backend;

use lisa_core::backend::DType;
use lisa_core::loss_scale::{LossScaleConfig, LossScaler, ScaleEvent};

use crate::data::Example;
use crate::distributed::{DataParallel, Shard};
use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::optim::{OptimConfig, Optimizer};
use crate::scheduler::NoiseProcess;
pub use crate::stream::{NoisedBatch, RunStream, TrainState, noise_batch, noise_batch_at};

/// A training run: the model, its optimizer, the settings `C`, the random stream with the
/// data position, and the noise process. Control training ([`crate::train::Trainer`]) and
/// prior pretraining ([`crate::pretrain::Pretrainer`]) are its two kinds.
pub struct TrainingRun<B: Backend, C> {
    /// The model.
    pub model: Box<dyn DualDenoiser<B>>,
    /// AdamW moments and the EMA.
    pub optimizer: Optimizer<B>,
    /// The run's settings.
    pub config: C,
    /// Random stream, data order and step: the resumable position of the run.
    pub run: RunStream,
    /// Identifies the run in its checkpoints (a run prunes only its own).
    pub run_id: String,
    pub(crate) noise: NoiseProcess,
    /// Control training's per-timestep scale of `τ`, once measured (never in pretraining).
    pub(crate) tau_norm: Option<crate::objective::TauNorm>,
    /// This run's rank in a data-parallel run (None: it trains alone).
    pub(crate) parallel: Option<DataParallel<B>>,
}

impl<B: Backend, C> TrainingRun<B, C> {
    /// Runs `f` with the EMA weights in the model in place of the trained ones, which are back
    /// when it returns; None (and `f` not run) when the run keeps no EMA.
    pub fn with_ema_weights<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> Option<R> {
        self.optimizer.ema.as_mut()?.swap(self.model.store_mut());
        let result = f(self);
        if let Some(ema) = self.optimizer.ema.as_mut() {
            ema.swap(self.model.store_mut());
        }
        Some(result)
    }
}

/// A fresh run id: the time and the process, hashed (not a source of model randomness).
pub(crate) fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// What the optimizer step of a run reads from its settings (the one copy of them).
pub trait StepSettings {
    /// AdamW and the lr schedule.
    fn optim(&self) -> &OptimConfig;
    /// Steps of the run (the length of the lr schedule).
    fn total_steps(&self) -> u64;
    /// The loss scaler's settings, used when the model autocasts to fp16 (torch's defaults).
    fn loss_scale(&self) -> LossScaleConfig {
        LossScaleConfig::default()
    }
}

/// What [`TrainingRun::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Applied {
    /// The true gradients' norm before clipping (inf or NaN on a skipped step).
    pub grad_norm: f32,
    /// The learning rate of the step.
    pub lr: f32,
    /// The loss scale the step's backward used (None: no loss scaling).
    pub loss_scale: Option<f32>,
    /// What the scaler did (None: no loss scaling).
    pub event: Option<ScaleEvent>,
}

/// The most examples per (micro-)batch and micro-batches per step any run takes.
pub const MAX_BATCH: usize = 1 << 20;

impl<B: Backend, C: StepSettings> TrainingRun<B, C> {
    /// The run's loss scaler where its model autocasts to fp16 (None otherwise): fresh, or
    /// where the run's state left it.
    pub(crate) fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        if self.model.store().autocast() != Some(DType::F16) {
            return Ok(None);
        }
        let config = self.config.loss_scale();
        let scaler = match self.run.state.loss_scale {
            Some(state) => LossScaler::resume(config, state),
            None => LossScaler::new(config),
        };
        scaler.map(Some).map_err(|e| TrainError::in_section("train.loss_scale", e))
    }

    /// Clips and applies `grads` as the run's next optimizer step and advances the step
    /// count. Under fp16 loss scaling the gradients are `S×` the true ones: they are unscaled,
    /// and a step whose loss (`loss_finite`) or gradients are inf or NaN is skipped (weights
    /// and moments unchanged) while the scaler halves `S` ([`LossScaler::update`]), as torch's
    /// `GradScaler` does; one that overflows even at the smallest scale is an error (the
    /// non-finite values do not come from fp16's range). Without loss scaling a non-finite
    /// gradient is an error. A step whose update makes a weight non-finite is an error naming
    /// the step, the tensor and the learning rate (the run should not be saved after it).
    pub(crate) fn apply(&mut self, grads: &mut [Option<B::Tensor>], loss_finite: bool) -> Result<Applied> {
        let done = self.run.state.step;
        let taken_before = done
            .checked_sub(self.run.state.skipped_steps)
            .ok_or(TrainError::Internal("more skipped steps than steps"))?;
        let scaled_norm = crate::optim::grad_norm::<B>(grads)?;
        let mut scaler = self.loss_scaler()?;
        let scale = scaler.as_ref().map(|s| s.scale());
        let inverse = scaler.as_ref().map_or(1.0, |s| s.inverse_scale());
        let floor = scaler.as_ref().is_some_and(|s| s.state().log2 == *lisa_core::loss_scale::LOG2_RANGE.start());
        let event = scaler.as_mut().map(|s| s.update(loss_finite && scaled_norm.is_finite()));
        if event == Some(ScaleEvent::Skipped) {
            if floor {
                return Err(TrainError::NonFinite { what: "gradient at the smallest loss scale", step: done + 1 });
            }
            self.run.state.loss_scale = scaler.map(|s| s.state());
            self.run.state.skipped_steps += 1;
            self.run.state.step = done + 1;
            let lr = self.config.optim().lr_at(taken_before, self.config.total_steps());
            if let Some(ema) = &mut self.optimizer.ema {
                // diffusers steps its EMA on every loop step, skipped or not.
                ema.update(self.model.store(), done + 1)?;
            }
            return Ok(Applied { grad_norm: scaled_norm * inverse, lr, loss_scale: scale, event });
        }
        if !scaled_norm.is_finite() {
            return Err(TrainError::NonFinite { what: "gradient norm", step: done + 1 });
        }
        let (config, store) = (&self.config, self.model.store_mut());
        let (norm, lr) = self.optimizer.step(
            store,
            grads,
            (scaled_norm, inverse),
            config.optim(),
            taken_before,
            done + 1,
            config.total_steps(),
        )?;
        // One reduction (one read-back) for all weights; the culprit is searched only on failure.
        let store = self.model.store();
        let mut total: Option<B::Tensor> = None;
        for (_, p) in store.iter().filter(|(_, p)| p.trainable) {
            let sq = B::sum_squares(&p.value)?;
            total = Some(match total {
                Some(t) => B::add(&t, &sq)?,
                None => sq,
            });
        }
        if let Some(t) = total
            && !B::item(&t)?.is_finite()
        {
            let mut culprit = String::from("a weight");
            for (_, p) in store.iter().filter(|(_, p)| p.trainable) {
                if !B::item(&B::sum_squares(&p.value)?)?.is_finite() {
                    culprit = p.name.clone();
                    break;
                }
            }
            return Err(TrainError::Diverged { step: done + 1, tensor: culprit, lr, grad_norm: norm });
        }
        self.run.state.loss_scale = scaler.map(|s| s.state());
        self.run.state.step = done + 1;
        Ok(Applied { grad_norm: norm, lr, loss_scale: scale, event })
    }
}

impl<B: Backend, C> TrainingRun<B, C> {
    /// The next `n` examples of `data` in the run's order (an error, not a panic, if the data
    /// position lies past the end of `data`). In a data-parallel run, `n` is this rank's share:
    /// the run takes the next `world × n` of the global order, of which this rank reads its
    /// rows ([`Shard::rows`]).
    pub(crate) fn next_examples(&mut self, data: &dyn crate::data::Dataset, n: usize) -> Result<Vec<Example>> {
        let shard = self.shard();
        let global = n.checked_mul(shard.world).ok_or(TrainError::Internal("a global batch overflows usize"))?;
        let indices = self.run.next_indices(data.len(), global)?;
        indices[shard.rows(n)].iter().map(|&i| data.get(i)).collect()
    }

    /// This run's rows of each global batch ([`Shard::WHOLE`] when it trains alone).
    pub fn shard(&self) -> Shard {
        self.parallel.as_ref().map_or(Shard::WHOLE, |p| p.shard())
    }

    /// This run's rank in a data-parallel run (None: it trains alone).
    pub fn data_parallel(&self) -> Option<&DataParallel<B>> {
        self.parallel.as_ref()
    }

    /// Whether this run does what a run's first rank alone does: write checkpoints, metrics,
    /// validation grids and the exported side network.
    pub fn is_first_rank(&self) -> bool {
        self.shard().rank == 0
    }
}
