//! The run file (`--config run.toml`) and the fixed validation set.

use std::path::Path;

use lisa_trainer::data::FillCircles;
use lisa_trainer::model::ModelConfig;
use lisa_trainer::pretrain::PretrainConfig;
use lisa_trainer::sample::SampleConfig;
use lisa_trainer::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// Everything a run file may set; every section and field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunFile {
    /// `[model.unet]`, `[model.control]`, `[model.decoder]`.
    pub model: ModelConfig,
    /// `[train]`: control training.
    pub train: TrainConfig,
    /// `[pretrain]`: prior training.
    pub pretrain: PretrainConfig,
    /// `[data]`: the procedural training set.
    pub data: DataConfig,
    /// `[validation]`: sampling settings of validation and `eval`.
    pub validation: ValidationConfig,
}

/// The fill-circles training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Number of distinct examples.
    pub len: usize,
    /// Seed of the set.
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { len: 50_000, seed: 0 }
    }
}

/// The fixed validation set: examples and sampling seeds never used for training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Number of validation conditions.
    pub samples: usize,
    /// Seed of the validation set (distinct from the training set's).
    pub seed: u64,
    /// The sampler.
    pub sampling: SampleConfig,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self { samples: 16, seed: 0x7a11d, sampling: SampleConfig::default() }
    }
}

impl RunFile {
    /// Reads a run file, or the defaults without one; names the file and the bad field.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The training set.
    pub fn training_set(&self) -> FillCircles {
        FillCircles { resolution: self.model.unet.resolution, len: self.data.len, seed: self.data.seed }
    }

    /// The validation set.
    pub fn validation_set(&self) -> FillCircles {
        FillCircles { resolution: self.model.unet.resolution, len: self.validation.samples, seed: self.validation.seed }
    }
}
