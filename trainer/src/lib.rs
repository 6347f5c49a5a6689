//! # lisa-trainer
//!
//! Reverse-mode autodiff over any `lisa` backend, the layers of a pixel-space UNet, the
//! ControlNet side network, the LISA decoder, AdamW with learning-rate schedules, and exact
//! checkpoints (lisa-method.md §1, §3, §5).

pub mod autodiff;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod fill50k;
pub mod image;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod optim;
pub mod params;
pub mod plot;
pub mod pretrain;
pub mod run;
pub mod sample;
pub mod train;

pub use error::{Result, TrainError};
