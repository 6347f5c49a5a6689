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
    /// One setting is out of its domain: `key` is its run-file path (`train.lisa.lambda`),
    /// so that a program can name the flag or the key its user wrote.
    #[error("{key}: {reason}")]
    Setting {
        /// The run-file path of the setting (`section.subsection.field`).
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// Run-time input does not fit the model (an example's size, a prompt it cannot read).
    #[error("{0}")]
    Mismatch(String),
    /// Tensors could not be serialised (safetensors, JSON).
    #[error("serialisation: {0}")]
    Serialize(String),
    /// Misuse of the autodiff tape (a bug in model code).
    #[error("autodiff: {0}")]
    Autodiff(&'static str),
    /// A run's output folder cannot be used as asked (in use, another run's outputs, no
    /// checkpoint to resume).
    #[error("{0}")]
    Output(String),
    /// The program observing a training run stopped it (it could not show or write what the
    /// run reported).
    #[error("{0}")]
    Observer(String),
    /// An invariant of lisa's own code does not hold (a bug in lisa, not a user error).
    #[error("internal error (a bug in lisa; please report it): {0}")]
    Internal(&'static str),
    /// A loss or gradient became NaN or infinite.
    #[error(
        "training diverged at step {step}: the {what} is NaN or infinite; lower the learning rate, and resume from the last checkpoint"
    )]
    NonFinite {
        /// What was not finite.
        what: &'static str,
        /// The training step.
        step: u64,
    },
    /// An optimizer step made a weight non-finite.
    #[error(
        "training diverged at step {step}: the update made {tensor} NaN or infinite (lr {lr:e}, gradient norm {grad_norm:e}); lower the learning rate or clip gradients, and resume from the last checkpoint"
    )]
    Diverged {
        /// The step whose update failed (1-based).
        step: u64,
        /// The first non-finite tensor.
        tensor: String,
        /// The learning rate of that step.
        lr: f32,
        /// The gradient norm before clipping.
        grad_norm: f32,
    },
    /// A tensor about to be saved holds NaN or infinite values (it is not written).
    #[error("tensor {tensor} holds NaN or infinite values; refusing to write it")]
    NonFiniteTensor {
        /// The tensor's name.
        tensor: String,
    },
    /// A checkpoint is missing, truncated, or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model file or folder is missing, malformed or does not fit (weights, configs,
    /// diffusers folders, tokenizers, embeddings).
    #[error("{path}: {reason}")]
    File {
        /// The file or folder.
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
    /// File-system error, with the path. The OS error is part of the message, not a
    /// separate cause (a report of the chain would print it twice).
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
}

impl TrainError {
    /// This error as it happened at training step `step`: a non-finite value a core op
    /// caught becomes [`TrainError::NonFinite`] (with the step and what to do); others pass.
    pub fn at_step(self, step: u64) -> Self {
        match self {
            Self::Core(lisa_core::Error::NonFinite { op }) => Self::NonFinite { what: op, step },
            other => other,
        }
    }

    /// A [`TrainError::Setting`] error for `key`.
    pub fn setting(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Setting { key: key.into(), reason: reason.into() }
    }

    /// A setting error for a core validation error under the run-file section `section`:
    /// the core error's `op` names the field. Other errors pass through.
    pub fn in_section(section: &str, e: lisa_core::Error) -> Self {
        match e {
            lisa_core::Error::InvalidArgument { op, reason } => Self::setting(format!("{section}.{op}"), reason),
            other => Self::Core(other),
        }
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_value_caught_by_a_core_op_says_the_step_and_what_to_do() {
        let e = TrainError::Core(lisa_core::Error::NonFinite { op: "mse_loss" }).at_step(7);
        let text = e.to_string();
        assert!(
            text.contains("step 7") && text.contains("mse_loss") && text.contains("lower the learning rate"),
            "{text}"
        );
        let other = TrainError::Config("x".into()).at_step(7);
        assert!(matches!(other, TrainError::Config(_)));
    }
}
