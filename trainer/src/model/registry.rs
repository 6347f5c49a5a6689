//! The architectures `lisa` can build, by name: the one place a new architecture is
//! registered.

use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

use super::{DecoderConfig, DualDenoiser, sd, toy};
use crate::error::{Result, TrainError};

/// A model as run files and checkpoints describe it: the architecture's name, the LISA
/// decoder's settings (the same for every architecture) and the architecture's own
/// configuration (every other key of the `[model]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Registry name (`"toy"`, the default).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// The LISA decoder (`[model.decoder]`).
    #[serde(default)]
    pub decoder: DecoderConfig,
    /// The architecture's own keys (for the toy: `[model.unet]`, `[model.control]`).
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_architecture() -> String {
    toy::NAME.to_string()
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self { architecture: default_architecture(), decoder: DecoderConfig::default(), config: Default::default() }
    }
}

/// Which parts to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The main network alone, every parameter trainable (pretraining the prior).
    Prior,
    /// Frozen main network + trainable side network, with the LISA decoder when `decoder`.
    Dual {
        /// Build the LISA decoder (LISA training; not baseline training or inference).
        decoder: bool,
    },
}

/// The registered architectures.
pub const ARCHITECTURES: &[&str] = &[toy::NAME, sd::NAME];

/// Builds `spec` with seeded initial weights on `device`.
pub fn build<B: Backend>(
    spec: &ModelSpec,
    parts: Parts,
    device: B::Device,
    seed: u64,
) -> Result<Box<dyn DualDenoiser<B>>> {
    match spec.architecture.as_str() {
        toy::NAME => Ok(Box::new(toy::ToyModel::new(spec, parts, device, seed)?)),
        sd::NAME => Ok(Box::new(sd::SdModel::new(spec, parts, device, seed)?)),
        other => Err(unknown(other)),
    }
}

/// Checks `spec` without building it (bad keys, values and sizes are errors naming them).
pub fn validate(spec: &ModelSpec) -> Result<()> {
    match spec.architecture.as_str() {
        toy::NAME => toy::ToyConfig::from_spec(spec).and_then(|c| c.validate(&spec.decoder)),
        sd::NAME => sd::SdSpec::from_spec(spec).and_then(|c| c.validate(&spec.decoder)),
        other => Err(unknown(other)),
    }
}

fn unknown(name: &str) -> TrainError {
    TrainError::Config(format!("unknown model architecture {name:?} (known: {})", ARCHITECTURES.join(", ")))
}

/// The model a weights file written by lisa records (its `lisa.model_spec` metadata), if any.
pub fn spec_of_weights(path: &std::path::Path) -> Result<Option<ModelSpec>> {
    let meta = crate::weights::read_metadata(path)?;
    match meta.get(crate::weights::MODEL_SPEC_KEY) {
        None => Ok(None),
        Some(json) => serde_json::from_str(json).map(Some).map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("its {} metadata is not a model description ({e})", crate::weights::MODEL_SPEC_KEY),
        }),
    }
}
