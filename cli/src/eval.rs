//! `lisa eval`, and the validation that `lisa train` runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use image::RgbImage;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_trainer::data::{Dataset, FillCircles};
use lisa_trainer::metrics::{colour_error, controllability_iou};
use lisa_trainer::model::{DualDenoiser, Parts, registry};
use lisa_trainer::sample::{SampleConfig, sample};
use lisa_trainer::scheduler::NoiseConfig;
use lisa_trainer::train::TrainConfig;

use crate::config::RunFile;
use crate::image::{canvas, paste_planar, save_png, upscaled};

/// What a validation measured.
pub struct Validation {
    /// Mean IoU between generated circles and the conditions' discs.
    pub iou: f32,
    /// Mean colour error (0 = perfect).
    pub colour_error: f32,
    /// Condition | sample pairs, eight pairs per row.
    pub grid: RgbImage,
}

/// Samples the validation set with fixed seeds and scores it.
pub fn validate<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    set: &FillCircles,
    cfg: &SampleConfig,
) -> Result<Validation> {
    let (r, n) = (set.resolution, set.len);
    let hint_channels = model.hint_channels();
    let mut hints = Vec::with_capacity(n * r * r);
    let mut prompts = Vec::with_capacity(n);
    for i in 0..n {
        let e = set.get(i)?;
        hints.extend_from_slice(&e.hint);
        prompts.push(e.prompt);
    }
    let hint = B::from_slice(&hints, &Shape::new([n, hint_channels, r, r]), DType::F32, model.store().device())
        .context("the validation outlines do not fit the model's condition channels")?;
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let images = B::to_vec(&sample(model, noise, &hint, &prompts, cfg)?)?;
    let per = 3 * r * r;
    let (mut iou, mut col) = (0.0, 0.0);
    let cols = 8.min(n).max(1);
    let mut grid = canvas(cols * 2 * (r + 2), n.div_ceil(cols) * (r + 2));
    for i in 0..n {
        let img = &images[i * per..(i + 1) * per];
        let circle = set.circle(i);
        iou += controllability_iou(img, r, &circle);
        col += colour_error(img, r, &circle);
        let (x, y) = ((i % cols) * 2 * (r + 2), (i / cols) * (r + 2));
        paste_planar(&mut grid, &hints[i * r * r..(i + 1) * r * r], 1, r, (x, y), (0.0, 1.0));
        paste_planar(&mut grid, img, 3, r, (x + r + 2, y), (-1.0, 1.0));
    }
    // Shown at ≥ 96 px per image: a 16-px sample is unreadable at its own size.
    let grid = upscaled(&grid, (96 / r).max(1));
    Ok(Validation { iou: iou / n as f32, colour_error: col / n as f32, grid })
}

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
    let v = validate(model.as_ref(), &file.train.noise, &set, &file.validation.sampling)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "iou {:.4}  colour_error {:.4}  ({} samples, {} steps)",
        v.iou, v.colour_error, file.validation.samples, file.validation.sampling.steps
    )
    .context("cannot write to standard output")?;
    if let Some(g) = a.grid {
        save_png(&v.grid, &g)?;
    }
    Ok(())
}
