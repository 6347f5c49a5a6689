//! `τ` normalised per timestep: the LISA target divided by its root mean square at its noise
//! level, so that the decoder regresses a target of unit scale at every timestep.
//!
//! `τ = s_t·(y − M(x_t))` depends only on the frozen prior `M` and the data, so its scale per
//! timestep is a fixed property of the run: it is measured once, before the first step, on
//! `examples` training examples in `buckets` equal buckets of timesteps (each bucket noising
//! the same examples with its own fixed draws and noise), as `rms_b = √(mean τ²)`. Training
//! then uses `τ / rms_b` (and the decoder predicts in those units): the per-sample target scale
//! `s_t` becomes `s_t / rms_b` for the bucket that holds the sample's noise level. The
//! measurement uses its own random streams, so turning it on changes nothing else in the run.

use lisa_core::backend::Backend;
use lisa_core::lisa::SampleTerms;
use lisa_core::{LisaConfig, NoiseLevel, Prediction};
use serde::{Deserialize, Serialize};

use crate::autodiff::Tape;
use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::scheduler::{NoiseProcess, add_noise};
use crate::tau_share::bucket_batch;

/// Offsets the measurement's seeds from the run's (its draws are not the training draws).
const SEED_OFFSET: u64 = 0x7461_755f_6e6f_726d;

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
        if !(1..=1000).contains(&self.buckets) || self.examples == 0 {
            return Err(TrainError::Config(format!(
                "normalize_tau needs 1..=1000 buckets and at least one example, got {} and {}",
                self.buckets, self.examples
            )));
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
    /// Measures `τ`'s root mean square per bucket on `examples` (module docs), in chunks of
    /// `chunk` examples per forward pass.
    pub fn measure<B: Backend>(
        model: &dyn DualDenoiser<B>,
        lisa: &LisaConfig,
        process: &NoiseProcess,
        examples: &[Example],
        config: &TauNormConfig,
        chunk: usize,
        seed: u64,
    ) -> Result<Self> {
        config.validate()?;
        if examples.is_empty() || chunk == 0 {
            return Err(TrainError::Config("measuring τ's scale needs at least one example".into()));
        }
        let kind = model.prediction();
        let buckets = config.buckets;
        let mut sigma_from = Vec::with_capacity(buckets);
        let mut rms = Vec::with_capacity(buckets);
        for b in 0..buckets {
            let range = (b as f32 / buckets as f32, (b + 1) as f32 / buckets as f32);
            sigma_from.push(process.draw(range.0)?.1.sigma);
            let (mut sum, mut count) = (0.0f64, 0usize);
            for (i, part) in examples.chunks(chunk).enumerate() {
                let stream_seed =
                    seed.wrapping_add(SEED_OFFSET).wrapping_add((b * examples.len().div_ceil(chunk) + i) as u64);
                let batch = bucket_batch::<B>(process, model, part, range, stream_seed, false)?;
                let tape = Tape::<B>::new();
                let p = model.store().bind(&tape);
                // [n, c, h, w]: the prior's prediction.
                let prior = tape.no_grad(|| -> Result<_> {
                    let x = tape.constant(batch.x_t.clone());
                    let enc = model.encode_main(&p, &x, &batch.cond)?;
                    Ok(model.decode_main(&p, &enc, None)?.value)
                })?;
                let scale = |l: &NoiseLevel<f32>| lisa.sample_terms(kind, *l).map_or(f32::NAN, |t| t.target_scale);
                // τ = s_t·(y − prior), [n, c, h, w].
                let tau = add_noise::<B>(&batch.y, &prior, |l| (scale(l), -scale(l)), &batch.levels)?;
                sum += B::item(&B::sum_squares(&tau)?)? as f64;
                count += B::shape(&tau).num_elements()?;
            }
            let r = (sum / count as f64).sqrt() as f32;
            if !(r.is_finite() && r > 0.0) {
                return Err(TrainError::Config(format!(
                    "τ's scale in timestep bucket {b} of {buckets} is {r}: it cannot be normalised"
                )));
            }
            rms.push(r);
        }
        if sigma_from.windows(2).any(|w| w[1] <= w[0]) {
            return Err(TrainError::Config(format!(
                "the noise levels do not grow across the {buckets} timestep buckets: use fewer buckets"
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

/// The LISA term's per-sample factors for `levels`: [`LisaConfig::sample_terms`], with `τ`
/// divided by its scale at each level when `norm` is given.
pub fn lisa_terms(
    lisa: &LisaConfig,
    kind: Prediction,
    levels: &[NoiseLevel<f32>],
    norm: Option<&TauNorm>,
) -> Result<Vec<SampleTerms<f32>>> {
    levels
        .iter()
        .map(|l| {
            let mut terms = lisa.sample_terms(kind, *l)?;
            if let Some(n) = norm {
                terms.target_scale *= n.factor(l);
            }
            Ok(terms)
        })
        .collect()
}
