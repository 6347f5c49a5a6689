//! `lisa eval`, and the validation that `lisa train` runs.

use std::path::{Path, PathBuf};

use clap::Args;
use lisa_core::backend::Backend;
use lisa_core::backend::{DType, Shape};
use lisa_trainer::data::{Dataset, FillCircles};
use lisa_trainer::image::Rgb8;
use lisa_trainer::metrics::{colour_error, controllability_iou};
use lisa_trainer::model::DualModel;
use lisa_trainer::sample::{SampleConfig, sample};
use lisa_trainer::train::NoiseConfig;

use crate::config::RunFile;

/// What a validation measured.
pub struct Validation {
    /// Mean IoU between generated circles and the conditions' discs.
    pub iou: f32,
    /// Mean colour error (0 = perfect).
    pub colour_error: f32,
    /// Condition | sample pairs, one row per example.
    pub grid: Rgb8,
}

/// Samples the validation set with fixed seeds and scores it.
pub fn validate<B: Backend>(
    model: &DualModel<B>,
    noise: &NoiseConfig,
    set: &FillCircles,
    cfg: &SampleConfig,
) -> Result<Validation, String> {
    let r = set.resolution;
    let n = set.len;
    let mut hints = Vec::with_capacity(n * r * r);
    let mut prompts = vec![Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..n {
        let e = set.get(i).map_err(|e| e.to_string())?;
        hints.extend_from_slice(&e.hint);
        prompts[0].push(e.prompt[0]);
        prompts[1].push(e.prompt[1]);
    }
    let hint = B::from_slice(&hints, &Shape::new([n, 1, r, r]), DType::F32, model.store.device())
        .map_err(|e| e.to_string())?;
    let images = sample(model, noise, &hint, &prompts, cfg).map_err(|e| e.to_string())?;
    let images = B::to_vec(&images).map_err(|e| e.to_string())?;
    let per = 3 * r * r;
    let (mut iou, mut col) = (0.0, 0.0);
    let cols = 8.min(n).max(1);
    let rows = n.div_ceil(cols);
    let mut grid = Rgb8::new(cols * 2 * (r + 2), rows * (r + 2));
    for i in 0..n {
        let img = &images[i * per..(i + 1) * per];
        let circle = set.circle(i);
        iou += controllability_iou(img, r, &circle);
        col += colour_error(img, r, &circle);
        let (x, y) = ((i % cols) * 2 * (r + 2), (i / cols) * (r + 2));
        grid.paste_planar(&hints[i * r * r..(i + 1) * r * r], 1, r, (x, y), (0.0, 1.0));
        grid.paste_planar(img, 3, r, (x + r + 2, y), (-1.0, 1.0));
    }
    // Shown at ≥ 96 px per image: a 16-px sample is unreadable at its own size.
    let grid = grid.upscaled((96 / r).max(1));
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
    pub fn load<B: Backend>(&self, device: B::Device) -> Result<(RunFile, DualModel<B>), String> {
        let file = RunFile::load(self.config.as_deref())?;
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

/// Builds the inference model: the prior, plus trained side weights from a checkpoint.
pub fn load_model<B: Backend>(
    file: &RunFile,
    main: &Path,
    checkpoint: Option<&Path>,
    device: B::Device,
) -> Result<DualModel<B>, String> {
    let model_cfg = match checkpoint {
        Some(dir) => lisa_trainer::checkpoint::read_configs(dir).map_err(|e| e.to_string())?.0,
        None => file.model.clone(),
    };
    let mut model = DualModel::<B>::new(&model_cfg, false, device, 0).map_err(|e| e.to_string())?;
    model.load_main(main).map_err(|e| e.to_string())?;
    if let Some(dir) = checkpoint {
        model.load_trained(&dir.join("model.safetensors")).map_err(|e| e.to_string())?;
    }
    Ok(model)
}

/// Runs `lisa eval`.
pub fn run<B: Backend>(a: EvalArgs, device: B::Device) -> Result<(), String> {
    let (mut file, model) = a.model.load::<B>(device)?;
    if let Some(s) = a.steps {
        file.validation.sampling.steps = s;
    }
    let v = validate(&model, &file.train.noise, &file.validation_set(), &file.validation.sampling)?;
    println!(
        "iou {:.4}  colour_error {:.4}  ({} samples, {} steps)",
        v.iou, v.colour_error, file.validation.samples, file.validation.sampling.steps
    );
    if let Some(g) = a.grid {
        v.grid.save_png(&g).map_err(|e| e.to_string())?;
    }
    Ok(())
}
