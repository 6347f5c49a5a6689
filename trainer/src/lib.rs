//! # lisa-trainer
//!
//! Reverse-mode autodiff over any `lisa` backend, layers, the model seam ([`model::DualDenoiser`])
//! with its architectures (the toy UNet + ControlNet + LISA decoder), the noise process and
//! the samplers' schedulers, AdamW with learning-rate schedules and EMA, training and
//! pretraining loops, and exact checkpoints (docs/method.md §1, §3, §5). A library only: the
//! `lisa` command, image files and plots live in the `lisa-cli` crate.

pub mod analysis;
pub mod autodiff;
pub mod checkpoint;
pub mod data;
pub mod differences;
pub mod distributed;
pub mod error;
pub mod grid;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod objective;
pub mod optim;
pub mod params;
pub mod pretrain;
pub mod run;
pub mod sample;
pub mod scheduler;
pub mod session;
pub mod stream;
pub mod tensor_file;
pub mod train;
pub mod validation;
pub mod weights;

pub use error::{Result, TrainError};
