//! The two implementations of the [`Validator`] trait the training run ([`crate::session`])
//! calls at its validation steps: the toy task's ([`ToyValidation`]: IoU, colour error, τ
//! shares, the linear probe) and latent diffusion pipelines' ([`LatentValidation`]: sampled,
//! VAE-decoded grids).

mod latent;
mod toy;

use lisa_core::backend::Backend;

pub use crate::grid::RgbGrid;
pub use crate::session::{ValidationReport, Validator};
pub use latent::{ControlScore, LatentValidation, MAX_SAMPLES_PER_PAIR};
pub use toy::{MAX_VALIDATION_SAMPLES, PROBE_EXAMPLES, PROBE_T, TAU_BUCKETS, ToyScores, ToyValidation, validate_toy};

use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::sample::SampleConfig;
use crate::scheduler::{self, NoiseConfig};

/// The sampler `sampling` applies to `model` trained with the noise process `noise` (steps,
/// η, scales, the sampler against the process): checked before the first step.
pub fn check_sampling<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    sampling: &SampleConfig,
) -> Result<()> {
    // Errors under the run-file section they come from.
    let keyed = |e: TrainError| match e {
        TrainError::Config(reason) => TrainError::setting("validation.sampling", reason),
        TrainError::Core(lisa_core::Error::InvalidArgument { reason, .. }) => {
            TrainError::setting("validation.sampling", reason)
        }
        other => other,
    };
    // The training noise process first: its errors are its own, not the sampler's.
    scheduler::NoiseProcess::new(noise).map_err(|e| TrainError::setting("train.noise", e.to_string()))?;
    sampling.validate().map_err(keyed)?;
    scheduler::build::<B>(noise, &sampling.scheduler(model.prediction())).map_err(keyed)?;
    Ok(())
}
