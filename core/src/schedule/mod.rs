//! Noise schedules: where a training example sits between data and noise.
//!
//! Every schedule reduces to a [`NoiseLevel`] `(α_t, σ_t)` of the forward process
//! `x_t = α_t·x₀ + σ_t·ε`, which is all the prediction, score and LISA math needs.
//! - [`DiscreteVp`]: diffusers-compatible discrete variance-preserving schedules
//!   (`α_t² + σ_t² = 1`, `α_t² = ᾱ_t = ∏_{s≤t}(1 − β_s)`).
//! - [`ContinuousVp`]: continuous-time VP (t ∈ [0, 1]).
//! - [`RectifiedFlow`]: `α_t = 1 − t`, `σ_t = t`, with the SD3 time shift as an option.

mod continuous;
mod discrete;
mod flow;
mod level;

pub use continuous::ContinuousVp;
pub use discrete::{BetaSchedule, DiscreteVp};
pub use flow::RectifiedFlow;
pub use level::{NoiseLevel, add_noise_batch};
