//! `lisa eval`: the toy task's validation (the library's `validate_toy`) of a checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_trainer::model::{DualDenoiser, Parts, registry, toy};
use lisa_trainer::train::TrainConfig;
use lisa_trainer::validation::validate_toy;

use crate::config::RunFile;
use crate::image::save_grid;

/// What `eval` and `sample` run, said when given something else.
const SUPPORTED: &str = "lisa eval and lisa sample run the toy model (a prior written by lisa pretrain, and a checkpoint of lisa train on it); a Stable Diffusion ControlNet is sampled by lisa train's validation (--validation-image) or, from its controlnet/ folder, by diffusers";

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
        if self.main.is_dir() {
            bail!("--main {} is a folder: {SUPPORTED}", self.main.display());
        }
        let names = lisa_trainer::weights::tensor_names(&self.main)
            .with_context(|| format!("--main {}", self.main.display()))?;
        if !names.iter().any(|n| n.starts_with("main.")) {
            bail!("--main {} is not a lisa prior (it holds no main.* tensors): {SUPPORTED}", self.main.display());
        }
        let mut file = RunFile::load(self.config.as_deref())?;
        if let Some(dir) = &self.checkpoint {
            let (spec, config, _) = lisa_trainer::checkpoint::read_configs(dir)?;
            if spec.architecture != toy::NAME {
                bail!(
                    "--checkpoint {} is a checkpoint of the {} architecture: {SUPPORTED}",
                    dir.display(),
                    spec.architecture
                );
            }
            // Sample with the noise process the side network was trained on.
            file.train.noise = config.noise;
        }
        file.resolve_model(&self.main)?;
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
