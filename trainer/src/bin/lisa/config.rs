//! The run file (`--config run.toml`) and the fixed validation set.

use std::path::{Path, PathBuf};

use lisa_trainer::data::{Dataset, FillCircles};
use lisa_trainer::fill50k::Fill50k;
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

/// The training set: procedural fill circles, or a Fill50K-format folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Number of distinct procedural examples.
    pub len: usize,
    /// Seed of the procedural set.
    pub seed: u64,
    /// A Fill50K-format folder (source/, target/, prompt.json) to train on instead.
    pub dir: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { len: 50_000, seed: 0, dir: None }
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

    /// The procedural training set.
    pub fn training_set(&self) -> FillCircles {
        FillCircles { resolution: self.model.unet.resolution, len: self.data.len, seed: self.data.seed }
    }

    /// The training set to use: the `data.dir` folder when set, else the procedural one.
    pub fn open_training_set(&self) -> Result<Box<dyn Dataset>, String> {
        match &self.data.dir {
            Some(dir) => {
                let set = Fill50k::open(dir, self.model.unet.resolution).map_err(|e| e.to_string())?;
                if set.unknown_colours() > 0 {
                    eprintln!(
                        "note: {} of {} prompts name colours outside the palette; those are embedded as the null prompt",
                        set.unknown_colours(),
                        set.len()
                    );
                }
                Ok(Box::new(set))
            }
            None => Ok(Box::new(self.training_set())),
        }
    }

    /// The validation set.
    pub fn validation_set(&self) -> FillCircles {
        FillCircles { resolution: self.model.unet.resolution, len: self.validation.samples, seed: self.validation.seed }
    }
}
