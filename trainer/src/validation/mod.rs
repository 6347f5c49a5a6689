//! What a training run validates with: the [`Validator`] trait the training run
//! ([`crate::session`]) calls at its validation steps, and its two implementations: the toy
//! task's ([`ToyValidation`]: IoU, colour error, τ shares, the linear probe) and latent
//! diffusion pipelines' ([`LatentValidation`]: sampled, VAE-decoded grids).

mod grid;
mod latent;
mod toy;

use lisa_core::backend::Backend;

pub use grid::RgbGrid;
pub use latent::LatentValidation;
pub use toy::{MAX_VALIDATION_SAMPLES, PROBE_EXAMPLES, PROBE_T, TAU_BUCKETS, ToyScores, ToyValidation, validate_toy};

use crate::error::Result;
use crate::model::DualDenoiser;
use crate::sample::SampleConfig;
use crate::scheduler::{self, NoiseConfig};
use crate::train::Trainer;

/// What one validation measured.
#[derive(Debug, Clone, Default)]
pub struct ValidationReport {
    /// The headline score progress displays show and run reports collect (the toy: IoU).
    pub score: Option<f32>,
    /// Named values added to the step's metrics row.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// A picture of the validation (condition | sample pairs).
    pub grid: Option<RgbGrid>,
}

/// Validates a control-training run at the steps the run chooses.
pub trait Validator<B: Backend> {
    /// The metrics this validator reports that every metrics row carries (null where the step
    /// did not validate), so that rows have the same columns.
    fn columns(&self) -> &[&'static str] {
        &[]
    }

    /// Measures the run's current model (never changes it).
    fn validate(&mut self, trainer: &Trainer<B>) -> Result<ValidationReport>;
}

/// The sampler `sampling` applies to `model` trained with the noise process `noise` (steps,
/// η, scales, the sampler against the process): checked before the first step.
pub fn check_sampling<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    sampling: &SampleConfig,
) -> Result<()> {
    sampling.validate()?;
    scheduler::build::<B>(noise, &sampling.scheduler(model.prediction()))?;
    Ok(())
}
