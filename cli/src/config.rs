//! The run file (`--config run.toml`): every section optional, unknown keys and wrong types
//! are errors naming the file, and the model section is checked when the file is read.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lisa_core::backend::Backend;
use lisa_trainer::data::{Dataset, FillCircles, prompt_colours};
use lisa_trainer::model::{DualDenoiser, ModelSpec, registry, toy};
use lisa_trainer::pretrain::PretrainConfig;
use lisa_trainer::sample::SampleConfig;
use lisa_trainer::train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::fill50k::Fill50k;

/// Everything a run file may set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunFile {
    /// `[model]`: `architecture` (default `"toy"`), `[model.decoder]`, and the
    /// architecture's own sections (the toy's `[model.unet]`, `[model.control]`).
    pub model: ModelSpec,
    /// `[train]`: control training.
    pub train: TrainConfig,
    /// `[pretrain]`: prior training.
    pub pretrain: PretrainConfig,
    /// `[data]`: the training set.
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
    /// Reads a run file, or the defaults without one, and checks the model section.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read run file {}", path.display()))?;
        let file: Self = toml::from_str(&text).with_context(|| format!("run file {}", path.display()))?;
        registry::validate(&file.model).with_context(|| format!("run file {}", path.display()))?;
        Ok(file)
    }

    /// The training set for `model`: the `data.dir` folder when set (every prompt read by the
    /// model once, so that one it cannot read fails now), else the procedural one.
    pub fn open_training_set<B: Backend>(&self, model: &dyn DualDenoiser<B>) -> Result<Box<dyn Dataset>> {
        let resolution = model.sample_shape()[1];
        let Some(dir) = &self.data.dir else {
            return Ok(Box::new(FillCircles { resolution, len: self.data.len, seed: self.data.seed }));
        };
        let set = Fill50k::open(dir, resolution)?;
        let prompts: Vec<&str> = set.prompts().collect();
        model.embed_prompts(&prompts).with_context(|| format!("{}/prompt.json", dir.display()))?;
        let outside = prompts.iter().filter(|p| prompt_colours(p).is_ok_and(|c| c.iter().any(Option::is_none))).count();
        if outside > 0 && model.architecture() == toy::NAME {
            eprintln!(
                "note: {outside} of {} prompts name colours outside the toy's palette; those colours are embedded as the null prompt",
                prompts.len()
            );
        }
        Ok(Box::new(set))
    }

    /// The validation set at `resolution`.
    pub fn validation_set(&self, resolution: usize) -> FillCircles {
        FillCircles { resolution, len: self.validation.samples, seed: self.validation.seed }
    }
}
