//! The trainer's error type.

use std::path::PathBuf;

/// Everything that can go wrong while building, training or checkpointing a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A backend op or core math failed (shape, dtype, domain…).
    #[error(transparent)]
    Core(#[from] lisa_core::Error),
    /// A configuration value is invalid (caught before any work starts).
    #[error("invalid config: {0}")]
    Config(String),
    /// Run-time input does not fit the model (an example's size, a prompt it cannot read).
    #[error("{0}")]
    Mismatch(String),
    /// Tensors could not be serialised (safetensors, JSON).
    #[error("serialisation: {0}")]
    Serialize(String),
    /// Misuse of the autodiff tape (a bug in model code).
    #[error("autodiff: {0}")]
    Autodiff(&'static str),
    /// A loss or gradient became NaN or infinite.
    #[error("non-finite {what} at step {step}: training diverged (lower the learning rate?)")]
    NonFinite {
        /// What was not finite.
        what: &'static str,
        /// The training step.
        step: u64,
    },
    /// A checkpoint is missing, truncated, or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A data file is missing, corrupt or malformed (images, prompt lists).
    #[error("{path}: {reason}")]
    Data {
        /// The file (with `:line` for a bad line of a list).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// File-system error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
