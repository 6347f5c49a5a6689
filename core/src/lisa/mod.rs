//! LISA: Likelihood Score Alignment (docs/method.md §3).
//!
//! A tiny decoder `D` reads the side network's pre-zero-conv feature `h` and is regressed
//! onto the approximated likelihood score
//!
//! `τ = sg(y − p_prior)`            (prediction units, the authors' choice), or
//! `τ = sg(b_t·(y − p_prior))`      (score units, `b_t` = [`crate::score::likelihood_score_scale`]),
//!
//! where `y` is the main target (ε, v, x₀ or u) and `p_prior` the frozen main network's
//! prediction *without* the side residuals. The training loss is
//! `L = MSE(p, y) + λ·Σ_b w_b·D_b(dec_b, τ_b)` with λ = 0.2 by default.
//!
//! **Stop-gradient contract.** Everything here is plain arithmetic on values: the
//! functions never see a graph. The caller guarantees that no gradient flows into `τ`,
//! i.e. `y` is data and `p_prior` comes from a no-grad forward. The gradient returned is
//! with respect to the decoder output only (`∂L/∂dec`); it reaches the side network through
//! `D`'s backward.

mod config;
mod distance;
mod loss;
mod target;

pub use config::{Distance, LisaConfig, SampleTerms, TargetSpace, Weighting};
pub use distance::{cosine_distance, mse_loss};
pub use loss::{LisaLoss, SampleCoefficients, SampleSums, lisa_loss, lisa_loss_fused, sample_coefficients};
pub use target::lisa_target;
