//! `lisa eval`: the toy task's validation (the library's `validate_toy`) of a checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_trainer::model::{DualDenoiser, Parts, registry};
use lisa_trainer::train::TrainConfig;
use lisa_trainer::validation::validate_toy;

use crate::config::RunFile;
use crate::image::save_grid;

/// The flags that name an inference model (shared by `eval` and `sample`).
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Run file (TOML): model shape, validation set and sampler.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The pretrained prior (safetensors written by `lisa pretrain`).
    #[arg(long)]
    pub main: PathBuf,
    /// A training checkpoint directory (omit for the prior alone).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
}

impl ModelArgs {
    /// The run file and the model these flags name.
    pub fn load<B: Backend>(&self, device: B::Device) -> Result<(RunFile, Box<dyn DualDenoiser<B>>)> {
        let mut file = RunFile::load(self.config.as_deref())?;
        file.resolve_model(&self.main)?;
        if let Some(dir) = &self.checkpoint {
            // Sample with the noise process the side network was trained on.
            file.train.noise = lisa_trainer::checkpoint::read_configs(dir)?.1.noise;
        }
        let model = load_model(&file, &self.main, self.checkpoint.as_deref(), device)?;
        Ok((file, model))
    }
}

/// Flags of `lisa eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Where to write the validation grid (PNG).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Sampling steps.
    #[arg(long)]
    steps: Option<usize>,
}

/// Builds the inference model: the prior, plus trained side weights from a checkpoint (whose
/// model description wins over the run file's).
pub fn load_model<B: Backend>(
    file: &RunFile,
    main: &Path,
    checkpoint: Option<&Path>,
    device: B::Device,
) -> Result<Box<dyn DualDenoiser<B>>> {
    let spec = match checkpoint {
        Some(dir) => {
            lisa_trainer::checkpoint::verify_file::<TrainConfig>(dir, "model.safetensors")?;
            lisa_trainer::checkpoint::read_configs(dir)?.0
        }
        None => file.model.clone(),
    };
    let mut model = registry::build::<B>(&spec, Parts::Dual { decoder: false }, device, 0)?;
    model.load_main(main).with_context(|| format!("loading the prior {}", main.display()))?;
    if let Some(dir) = checkpoint {
        model.load_trained(&dir.join("model.safetensors"))?;
    }
    Ok(model)
}

/// Runs `lisa eval`.
pub fn run<B: Backend>(a: EvalArgs, device: B::Device) -> Result<()> {
    let (mut file, model) = a.model.load::<B>(device)?;
    file.check_sampling(model.as_ref())?;
    if let Some(s) = a.steps {
        file.validation.sampling.steps = s;
    }
    let set = file.validation_set(model.sample_shape()[1]);
    let v = validate_toy(model.as_ref(), &file.train.noise, &set, &file.validation.sampling)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "iou {:.4}  colour_error {:.4}  ({} samples, {} steps)",
        v.iou, v.colour_error, file.validation.samples, file.validation.sampling.steps
    )
    .context("cannot write to standard output")?;
    if let Some(g) = a.grid {
        save_grid(&v.grid, &g)?;
    }
    Ok(())
}
