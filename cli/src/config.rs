//! The run file (`--config run.toml`): every section optional, unknown keys and wrong types
//! are errors naming the file, and the model section is checked when the file is read.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_core::backend::{Backend, MemoryCapacity};
use lisa_trainer::TrainError;
use lisa_trainer::data::{Dataset, FillCircles, prompt_colours};
use lisa_trainer::model::{DualDenoiser, ModelSpec, registry, toy};
use lisa_trainer::pretrain::PretrainConfig;
use lisa_trainer::sample::SampleConfig;
use lisa_trainer::train::TrainConfig;
use serde::{Deserialize, Serialize};

use crate::fill50k::{Fill50k, Layout};

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
    /// Whether the file describes the networks (an architecture other than the toy, or keys
    /// of its own); if not, commands take them from the weights they load.
    #[serde(skip)]
    pub model_given: bool,
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
    /// Precomputed latents of its targets (latent-space models; default
    /// `latents.safetensors` in the folder).
    pub latents: Option<PathBuf>,
    /// Precomputed latents of its conditions (models whose side network reads VAE-encoded
    /// conditions, sd3; default `condition_latents.safetensors` in the folder).
    pub condition_latents: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { len: 50_000, seed: 0, dir: None, latents: None, condition_latents: None }
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

/// The most examples a procedural set may have (its shuffled order is held in memory).
const MAX_PROCEDURAL: usize = 1 << 26;

/// Fails when a batch of `batch` samples of `model` cannot fit in the memory its tensors go
/// into: its inputs alone may take at most an eighth of it (the activations take many times
/// more).
pub fn check_memory<B: Backend>(model: &dyn DualDenoiser<B>, batch: usize) -> Result<()> {
    let [c, h, w] = model.sample_shape();
    let bytes = [batch, c, h, w, 4].iter().try_fold(1usize, |acc, &x| acc.checked_mul(x));
    let capacity = B::memory_capacity(model.store().device());
    let Some((total, holder)) = memory_of(capacity, B::name(), memory_bytes) else { return Ok(()) };
    match bytes {
        Some(b) if b as u128 <= total / 8 => Ok(()),
        _ => bail!(
            "a batch of {batch} samples of {c}×{h}×{w} cannot fit in {holder}'s {} GiB of memory; lower the batch size or the resolution",
            total >> 30
        ),
    }
}

/// Fails when training needs more than the memory its tensors go into on `device` (`needed`
/// bytes: the weights, the ControlNet's optimizer state, a floor of the activations), before
/// anything is allocated: the host's memory on the CPU backends, the GPU's own on CUDA. Where
/// the backend cannot say how much memory its device has (wgpu) the need is told, not checked.
pub fn check_training_bytes<B: Backend>(needed: u128, device: &B::Device) -> Result<()> {
    if let Some(note) = training_memory(needed, B::memory_capacity(device), B::name(), memory_bytes)? {
        eprintln!("{note}");
    }
    Ok(())
}

/// [`check_training_bytes`]'s verdict for a device of `capacity` on backend `backend`
/// (`host`: the host's memory): an error, a note to print, or nothing to say.
fn training_memory(
    needed: u128,
    capacity: MemoryCapacity,
    backend: &str,
    host: impl Fn() -> usize,
) -> Result<Option<String>> {
    match memory_of(capacity, backend, host) {
        Some((total, holder)) => fits(needed, total, &holder).map(|()| None),
        None => Ok(Some(format!(
            "note: the {backend} backend does not report how much memory its device has: this run needs at least {:.1} GiB there (not checked)",
            gib(needed)
        ))),
    }
}

/// The memory of a device of `capacity` on backend `backend` in bytes (`host`: the host's),
/// and what holds it (for messages); None where the backend cannot say.
fn memory_of(capacity: MemoryCapacity, backend: &str, host: impl Fn() -> usize) -> Option<(u128, String)> {
    match capacity {
        MemoryCapacity::Host => Some((host() as u128, "this machine".to_string())),
        MemoryCapacity::Device { bytes } => Some((bytes as u128, format!("the {backend} device"))),
        MemoryCapacity::Unknown => None,
    }
}

/// Fails when `needed` bytes are more than `total`, the memory of `holder`.
fn fits(needed: u128, total: u128, holder: &str) -> Result<()> {
    if needed > total {
        bail!(
            "this model at this resolution and batch size needs at least {:.1} GiB (weights, the ControlNet's optimizer state, activations); {holder} has {:.1} GiB; lower --resolution or --train-batch-size, or use --mixed-precision",
            gib(needed),
            gib(total)
        );
    }
    Ok(())
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// This machine's memory in bytes (`MemTotal` of `/proc/meminfo`; unbounded where unknown).
pub fn memory_bytes() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(usize::MAX, |kib| kib.saturating_mul(1024))
}

/// A library error about one setting ([`TrainError::Setting`]) said the way the user set it:
/// under the flag when the user gave it (`flags`: run-file key, flag, whether given), else
/// under the run file's section and key. Other errors pass through.
pub fn name_setting(e: TrainError, flags: &[(&str, &str, bool)], file: Option<&Path>) -> anyhow::Error {
    let TrainError::Setting { key, reason } = &e else { return e.into() };
    if let Some((_, flag, _)) = flags.iter().find(|(k, _, given)| *given && k == key) {
        return anyhow::anyhow!("{flag}: {reason}");
    }
    let (section, field) = key.rsplit_once('.').unwrap_or(("", key));
    match file {
        Some(path) => anyhow::anyhow!("run file {}: [{section}] {field}: {reason}", path.display()),
        None => anyhow::anyhow!("[{section}] {field}: {reason}"),
    }
}

impl RunFile {
    /// The validation sampler applies to this model (steps, η, scales, sampler vs noise
    /// process): checked now, not after the last step.
    pub fn check_sampling<B: Backend>(&self, model: &dyn DualDenoiser<B>) -> Result<()> {
        Ok(lisa_trainer::validation::check_sampling(model, &self.train.noise, &self.validation.sampling)?)
    }

    /// Reads a run file, or the defaults without one, and checks the model section.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read run file {}", path.display()))?;
        Self::from_toml(&text, &format!("run file {}", path.display()))
    }

    /// Parses a run file's text; errors name `origin`.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let mut file: Self = toml::from_str(text).with_context(|| origin.to_string())?;
        // The networks are described by an architecture other than the default or by any key
        // of the architecture's own (everything of `[model]` but `decoder`).
        file.model_given = file.model.architecture != toy::NAME || !file.model.config.is_empty();
        registry::validate(&file.model).with_context(|| origin.to_string())?;
        if file.data.len > MAX_PROCEDURAL {
            bail!("{origin}: [data] len {} is more than {MAX_PROCEDURAL} examples", file.data.len);
        }
        Ok(file)
    }

    /// Takes the networks from the weights file `prior` when this file does not describe them
    /// (a prior written by `lisa pretrain` records its model); a run file that does describe
    /// them must agree with the prior, which loading checks.
    pub fn resolve_model(&mut self, prior: &Path) -> Result<()> {
        if self.model_given {
            return Ok(());
        }
        if let Some(spec) = registry::spec_of_weights(prior)? {
            self.model.architecture = spec.architecture;
            self.model.config = spec.config;
        }
        Ok(())
    }

    /// The training set for `model`: the `data.dir` folder when set (every prompt read by the
    /// model once, so that one it cannot read fails now), else the procedural one.
    pub fn open_training_set<B: Backend>(&self, model: &dyn DualDenoiser<B>) -> Result<Box<dyn Dataset>> {
        let resolution = model.sample_shape()[1];
        let Some(dir) = &self.data.dir else {
            if model.latent_space() {
                bail!("a latent-space model trains on a dataset folder with precomputed latents (--train-data-dir)");
            }
            return Ok(Box::new(FillCircles { resolution, len: self.data.len, seed: self.data.seed }));
        };
        let latents = match (&self.data.latents, model.latent_space()) {
            (_, false) => None,
            (Some(file), true) => Some(file.clone()),
            (None, true) => Some(dir.join(crate::fill50k::LATENTS_FILE)),
        };
        let hint_latents = model.latent_hints().then(|| {
            self.data.condition_latents.clone().unwrap_or_else(|| dir.join(crate::fill50k::CONDITION_LATENTS_FILE))
        });
        let layout = Layout { image: model.sample_shape(), hint: model.hint_shape(), latents, hint_latents };
        let set = Fill50k::open(dir, layout)?;
        decode_all(&set)?;
        let prompts: Vec<&str> = set.prompts().collect();
        model.check_prompts(&prompts).with_context(|| format!("{}/prompt.json", dir.display()))?;
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

/// Reads every example of a folder once, so that a truncated or unreadable file is reported
/// now, with its line in `prompt.json`, not when first drawn (with a progress bar on a
/// terminal). The examples are read on every core of the current thread pool (decoding the
/// images is the cost: 50,000 conditions at 512 px take minutes on one core); the error
/// reported is the first in file order, whatever the thread count.
fn decode_all(set: &Fill50k) -> Result<()> {
    use rayon::prelude::*;
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| indicatif::ProgressBar::new(set.len() as u64).with_message("checking the dataset"));
    let first_error = (0..set.len()).into_par_iter().find_map_first(|i| {
        let read = set.get(i).with_context(|| format!("line {} of prompt.json", set.line(i)));
        if let Some(b) = &bar {
            b.inc(1);
        }
        read.err()
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u128 = 1 << 30;

    /// The need is checked against the memory the tensors go into: the host's on the CPU, the
    /// GPU's own where the backend reports it (a GPU run is not refused for the host's memory,
    /// nor let through for it), and told where it cannot be checked.
    #[test]
    fn training_memory_is_checked_where_the_tensors_live() {
        let host = || 16usize << 30;
        let gpu = MemoryCapacity::Device { bytes: 80 << 30 };
        assert!(training_memory(10 * GIB, MemoryCapacity::Host, "cpu", host).unwrap().is_none());
        let err = training_memory(20 * GIB, MemoryCapacity::Host, "cpu", host).unwrap_err().to_string();
        assert!(err.contains("needs at least 20.0 GiB") && err.contains("this machine has 16.0 GiB"), "{err}");
        assert!(training_memory(40 * GIB, gpu, "cuda", host).unwrap().is_none(), "fits the GPU, not the host");
        let err = training_memory(90 * GIB, gpu, "cuda", host).unwrap_err().to_string();
        assert!(err.contains("the cuda device has 80.0 GiB"), "{err}");
        let note = training_memory(90 * GIB, MemoryCapacity::Unknown, "wgpu", host).unwrap().unwrap();
        assert!(note.contains("needs at least 90.0 GiB there (not checked)"), "{note}");
    }
}
