//! What every training run shares: the model, its optimizer and settings, the random
//! stream with the data position ([`crate::stream`]), and the optimizer step.

use lisa_core::backend::Backend;

use crate::data::Example;
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
}

/// The most examples per (micro-)batch and micro-batches per step any run takes.
pub const MAX_BATCH: usize = 1 << 20;

impl<B: Backend, C: StepSettings> TrainingRun<B, C> {
    /// Clips and applies `grads` as the run's next optimizer step and advances the step
    /// count. Returns `(gradient norm, lr)`. A step whose update makes a weight non-finite
    /// is an error naming the step, the tensor and the learning rate (the run should not be
    /// saved after it).
    pub(crate) fn apply(&mut self, grads: &mut [Option<B::Tensor>]) -> Result<(f32, f32)> {
        let done = self.run.state.step;
        let (config, store) = (&self.config, self.model.store_mut());
        let (norm, lr) = self.optimizer.step(store, grads, config.optim(), done, config.total_steps())?;
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
        self.run.state.step = done + 1;
        Ok((norm, lr))
    }
}

impl<B: Backend, C> TrainingRun<B, C> {
    /// The next `n` examples of `data` in the run's order (an error, not a panic, if the data
    /// position lies past the end of `data`).
    pub(crate) fn next_examples(&mut self, data: &dyn crate::data::Dataset, n: usize) -> Result<Vec<Example>> {
        self.run.next_indices(data.len(), n)?.into_iter().map(|i| data.get(i)).collect()
    }
}
