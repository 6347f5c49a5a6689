//! # lisa-core
//!
//! The backend-agnostic heart of `lisa`: noise schedules, prediction parameterisations,
//! the score decomposition of a dual-branch (ControlNet-style) model, and the LISA
//! (Likelihood Score Alignment) target, distances and loss with its analytic gradient.
//! It also defines the tensor/backend traits every backend implements, and a plain-slice
//! [`reference`] implementation that is both the oracle for backends and the way to embed
//! the math in another framework.
//!
//! The crate is `no_std` + `alloc` (disable the default `std` feature); it performs no I/O.
//!
//! Notation used in every doc comment (lisa-method.md §2–3):
//! `x_t = α_t·x₀ + σ_t·ε`, score `∇log p(x_t) = −ε̂/σ_t`,
//! `∇log p(x|c) = ∇log p(x) + ∇log p(c|x)` (conditional = prior + likelihood),
//! LISA target `τ = sg(y − prior)`, loss `L = MSE(pred, y) + λ·D(dec(h, t), τ)`.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]
// `!(x > 0)` is deliberate throughout: unlike `x <= 0` it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

extern crate alloc;

pub mod backend;
mod error;
pub mod lisa;
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
