//! `τ` normalised per timestep: the LISA target divided by its root mean square at its noise
//! level, so that the decoder regresses a target of unit scale at every timestep.
//!
//! `τ = s_t·(y − M(x_t))` depends only on the frozen prior `M` and the data, so its scale per
//! timestep is a fixed property of the run: it is measured once, before the first step, on
//! `examples` training examples in `buckets` equal buckets of timesteps (each bucket noising
//! the same examples with its own fixed draws and noise), as `rms_b = √(mean τ²)`
//! ([`measure_tau_norm`]). Training
//! then uses `τ / rms_b` (and the decoder predicts in those units): the per-sample target scale
//! `s_t` becomes `s_t / rms_b` for the bucket that holds the sample's noise level. The
//! measurement uses its own random streams, so turning it on changes nothing else in the run.

use lisa_core::backend::Backend;
use lisa_core::{LisaConfig, NoiseLevel};
use serde::{Deserialize, Serialize};

use super::{bucket_batch, in_tau_units};
use crate::autodiff::Tape;
use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::scheduler::NoiseProcess;

/// How `τ`'s scale per timestep is measured (`[train.normalize_tau]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TauNormConfig {
    /// Equal buckets of timesteps, each with its own scale (20).
    pub buckets: usize,
    /// Training examples noised in every bucket (256; fewer when the data has fewer).
    pub examples: usize,
}

impl Default for TauNormConfig {
    fn default() -> Self {
        Self { buckets: 20, examples: 256 }
    }
}

impl TauNormConfig {
    /// At least one bucket and one example, at most 1000 buckets.
    pub fn validate(&self) -> Result<()> {
        if !(1..=1000).contains(&self.buckets) {
            return Err(TrainError::setting(
                "train.normalize_tau.buckets",
                format!("must lie in 1..=1000, got {}", self.buckets),
            ));
        }
        if self.examples == 0 {
            return Err(TrainError::setting("train.normalize_tau.examples", "must be at least 1, got 0"));
        }
        Ok(())
    }
}

/// The measured scale of `τ` per bucket of noise levels.
#[derive(Debug, Clone, PartialEq)]
pub struct TauNorm {
    /// The σ at which each bucket starts (increasing; the first bucket also takes anything
    /// below its start).
    sigma_from: Vec<f32>,
    /// `√(mean τ²)` per bucket.
    rms: Vec<f32>,
}

impl TauNorm {
    /// From the σ at which each bucket starts (strictly increasing) and `√(mean τ²)` per
    /// bucket (finite, > 0); [`measure_tau_norm`] measures both.
    pub fn new(sigma_from: Vec<f32>, rms: Vec<f32>) -> Result<Self> {
        if sigma_from.is_empty() || sigma_from.len() != rms.len() {
            return Err(TrainError::Config(format!(
                "τ's scale needs one σ and one rms per bucket, got {} and {}",
                sigma_from.len(),
                rms.len()
            )));
        }
        if let Some((b, r)) = rms.iter().enumerate().find(|(_, r)| !(r.is_finite() && **r > 0.0)) {
            return Err(TrainError::Config(format!(
                "τ's scale in timestep bucket {b} of {} is {r}: it cannot be normalised",
                rms.len()
            )));
        }
        if sigma_from.windows(2).any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less)) {
            return Err(TrainError::Config(format!(
                "the noise levels do not grow across the {} timestep buckets: use fewer buckets",
                rms.len()
            )));
        }
        Ok(Self { sigma_from, rms })
    }

    /// `√(mean τ²)` per bucket, low noise first.
    pub fn rms(&self) -> &[f32] {
        &self.rms
    }

    /// The bucket holding `level`.
    pub fn bucket(&self, level: &NoiseLevel<f32>) -> usize {
        self.sigma_from.partition_point(|&s| s <= level.sigma).saturating_sub(1)
    }

    /// `1 / rms` of `level`'s bucket.
    pub fn factor(&self, level: &NoiseLevel<f32>) -> f32 {
        1.0 / self.rms[self.bucket(level)]
    }
}

/// Offsets the τ-scale measurement's seeds from the run's (its draws are not the training draws).
const TAU_NORM_SEED_OFFSET: u64 = 0x7461_755f_6e6f_726d;

/// Measures `τ`'s root mean square per bucket of timesteps on `examples`, in chunks of `chunk`
/// examples per forward pass, for [`TauNorm`] (this module's docs): every bucket noises
/// the same examples with its own draws and noise, seeded from `seed`.
pub fn measure_tau_norm<B: Backend>(
    model: &dyn DualDenoiser<B>,
    lisa: &LisaConfig,
    process: &NoiseProcess,
    examples: &[Example],
    config: &TauNormConfig,
    chunk: usize,
    seed: u64,
) -> Result<TauNorm> {
    config.validate()?;
    if examples.is_empty() || chunk == 0 {
        return Err(TrainError::Config("measuring τ's scale needs at least one example".into()));
    }
    let kind = model.prediction();
    let buckets = config.buckets;
    let chunks = examples.len().div_ceil(chunk);
    let mut sigma_from = Vec::with_capacity(buckets);
    let mut rms = Vec::with_capacity(buckets);
    for b in 0..buckets {
        let range = (b as f32 / buckets as f32, (b + 1) as f32 / buckets as f32);
        sigma_from.push(process.draw(range.0)?.1.sigma);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (i, part) in examples.chunks(chunk).enumerate() {
            let stream_seed = seed.wrapping_add(TAU_NORM_SEED_OFFSET).wrapping_add((b * chunks + i) as u64);
            let batch = bucket_batch::<B>(process, model, part, range, stream_seed, false)?;
            let tape = Tape::<B>::new();
            let p = model.store().bind(&tape);
            // [n, c, h, w]: the prior's prediction.
            let prior = tape.no_grad(|| -> Result<_> {
                let x = tape.constant(batch.x_t.clone());
                let enc = model.encode_main(&p, &x, &batch.cond)?;
                Ok(model.decode_main(&p, &enc, None)?.value)
            })?;
            // τ = s_t·(y − prior), [n, c, h, w].
            let tau = in_tau_units::<B>(&batch.y, &prior, lisa, kind, None, &batch.levels)?;
            sum += B::item(&B::sum_squares(&tau)?)? as f64;
            count += B::shape(&tau).num_elements()?;
        }
        rms.push((sum / count as f64).sqrt() as f32);
    }
    TauNorm::new(sigma_from, rms)
}
