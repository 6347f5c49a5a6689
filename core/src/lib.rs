//! # lisa-core
//!
//! The backend-agnostic heart of `lisa`: noise schedules, prediction parameterisations,
//! the score decomposition of a dual-branch (ControlNet-style) model, and the LISA
//! (Likelihood Score Alignment) target, distances and loss with its analytic gradient.
//! It also defines the tensor/backend traits every backend implements, and a plain-slice
//! [`reference`](mod@reference) implementation that is both the oracle for backends and the way to embed
//! the math in another framework.
//!
//! The crate is `no_std` + `alloc` (disable the default `std` feature); it performs no I/O.
//!
//! Notation used in every doc comment (docs/method.md §2–3):
//! `x_t = α_t·x₀ + σ_t·ε`, score `∇log p(x_t) = −ε̂/σ_t`,
//! `∇log p(x|c) = ∇log p(x) + ∇log p(c|x)` (conditional = prior + likelihood),
//! LISA target `τ = sg(y − prior)`, loss `L = MSE(pred, y) + λ·D(dec(h, t), τ)`.
//!
//! ```
//! use lisa_core::lisa::lisa_loss_fused;
//! use lisa_core::schedule::{BetaSchedule, DiscreteVp};
//! use lisa_core::{LisaConfig, Prediction};
//!
//! // One sample of 4 elements at DDPM step 500, ε-prediction.
//! let schedule = DiscreteVp::<f32>::new(BetaSchedule::DDPM_LINEAR, 1000)?;
//! let config = LisaConfig::default(); // λ = 0.2, τ in prediction units, MSE
//! let terms = config.sample_terms(Prediction::Epsilon, schedule.level(500)?)?;
//! let eps = [0.5, -1.0, 0.25, 2.0]; // the main target y = ε
//! let prior = [0.4, -0.8, 0.25, 1.0]; // frozen main net without side residuals
//! let decoded = [0.0; 4]; // zero-initialised decoder at step 0
//! let mut grad = [0.0; 4];
//! let loss = lisa_loss_fused(&config, &[terms], &decoded, &eps, &prior, &mut grad)?;
//! // τ = ε − prior = [0.1, −0.2, 0, 1]; L = 0.2 · mean(τ²) = 0.2 · 1.05 / 4
//! assert!((loss.weighted - 0.0525).abs() < 1e-6);
//! assert!((grad[3] - (-0.1)).abs() < 1e-6); // 2λ(d − τ)/N = 0.4 · (−1) / 4
//! # Ok::<(), lisa_core::Error>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
// `!(x > 0)` is deliberate throughout: unlike `x <= 0` it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

extern crate alloc;

pub mod backend;
mod error;
pub mod lisa;
pub mod loss_scale;
pub mod optim;
pub mod prediction;
pub mod real;
pub mod reference;
pub mod rng;
pub mod schedule;
pub mod score;
mod slices;
pub mod tolerance;

pub use backend::{Backend, DType, Shape};
pub use error::{Error, Result};
pub use lisa::{Distance, LisaConfig, TargetSpace, Weighting};
pub use prediction::{Affine, Prediction};
pub use real::Real;
pub use schedule::NoiseLevel;
