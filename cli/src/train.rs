//! `lisa train`: the side branch, with LISA or the baseline objective.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_core::{Distance, TargetSpace};
use lisa_trainer::model::HookLayer;
use lisa_trainer::model::sd::{
    MixedPrecision, Pipeline, SD_VAE_DOWNSCALE, UNetConfig, Vae, VaeConfig, latent_side, read_json_config,
};
use lisa_trainer::model::{DualDenoiser, Parts, registry};
use lisa_trainer::optim::LrSchedule;
use lisa_trainer::session::{self, RunOptions, RunReport};
use lisa_trainer::train::{Mode, Trainer};
use lisa_trainer::validation::{LatentValidation, ToyValidation, Validator};

use crate::config::{RunFile, SdInputs, check_memory, name_setting};
use crate::progress::RunDisplay;
use crate::run_dir::CheckpointArgs;
use crate::sd_cache;
use crate::sd_validation::{LatentValidationFiles, read_conditions, validation_pairs};

/// Flags of `lisa train` (names as in diffusers' `train_controlnet.py`; they override the
/// run file).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run file (TOML) whose values the flags override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pretrained prior (safetensors written by `lisa pretrain`).
    #[arg(long, required_unless_present = "pretrained_model_name_or_path")]
    main: Option<PathBuf>,
    /// A diffusers Stable Diffusion pipeline folder (unet/, scheduler/, …): train a
    /// ControlNet for its UNet (the sd architecture; latents and text embeddings precomputed).
    #[arg(long, conflicts_with = "main")]
    pretrained_model_name_or_path: Option<PathBuf>,
    /// A diffusers ControlNet folder to start from (default: a copy of the UNet's encoder).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    controlnet_model_name_or_path: Option<PathBuf>,
    /// Training resolution in pixels (images resized and centre-cropped to it; default: the
    /// UNet's sample_size × the VAE's downscale).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    resolution: Option<usize>,
    /// Where the latents and text embeddings are cached (computed once per dataset with the
    /// pipeline's VAE and text encoder; default: OUTPUT_DIR/cache).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    cache_dir: Option<PathBuf>,
    /// A condition image to validate with (repeatable; one --validation-prompt each, or one
    /// for all).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    validation_image: Vec<PathBuf>,
    /// The prompt of each --validation-image.
    #[arg(long, requires = "validation_image")]
    validation_prompt: Vec<String>,
    /// The share of training prompts replaced by the empty prompt (classifier-free guidance).
    #[arg(long)]
    proportion_empty_prompts: Option<f32>,
    /// Recompute the side network's activations in the backward instead of holding them
    /// (less memory, one more side-network forward per step; the same training).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// no | fp16 | bf16: the frozen UNet, VAE and text encoder stored in half precision; the
    /// ControlNet, the LISA decoder and the optimizer state stay in f32.
    #[arg(long, default_value = "no", requires = "pretrained_model_name_or_path")]
    mixed_precision: MixedPrecision,
    /// Train with the LISA term (the default).
    #[arg(long, conflicts_with = "baseline")]
    lisa: bool,
    /// Train the plain ControlNet baseline (no decoder, no prior pass).
    #[arg(long)]
    baseline: bool,
    /// Side layer the LISA decoder reads: down_0 .. down_N | mid (default: the
    /// architecture's, down_1 for the toy, down_5 for Stable Diffusion).
    #[arg(long)]
    hook: Option<HookLayer>,
    /// λ, the weight of the LISA term.
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f64>,
    /// prediction | score.
    #[arg(long)]
    target_space: Option<TargetSpace>,
    /// mse | cosine.
    #[arg(long)]
    distance: Option<Distance>,
    /// Apply LISA to the first N samples of each batch only.
    #[arg(long)]
    lisa_subbatch: Option<usize>,
    /// The LISA decoder's learning rate as a multiple of the side network's.
    #[arg(long, allow_negative_numbers = true)]
    decoder_lr_scale: Option<f32>,
    /// Divide τ by its scale at each timestep (measured on the prior before the first step;
    /// `[train.normalize_tau]` sets its buckets and examples).
    #[arg(long)]
    normalize_tau: bool,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Optimizer steps.
    #[arg(long)]
    max_train_steps: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long)]
    train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f32>,
    /// constant | constant_with_warmup | cosine.
    #[arg(long)]
    lr_scheduler: Option<LrSchedule>,
    /// Warm-up steps.
    #[arg(long)]
    lr_warmup_steps: Option<u64>,
    /// Gradient-norm clip.
    #[arg(long)]
    max_grad_norm: Option<f32>,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    /// Validate (sample, IoU, grid) every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    validation_steps: u64,
    /// A Fill50K-format folder to train on (source/, target/, prompt.json); default: the
    /// procedural fill-circles set.
    #[arg(long)]
    train_data_dir: Option<PathBuf>,
    /// Where checkpoints, grids and metrics.jsonl go.
    #[arg(long, default_value = "runs/train")]
    output_dir: PathBuf,
}

/// Applies the flags to the run file (the library checks the values: [`check_settings`]).
fn apply(a: &TrainArgs, file: &mut RunFile) {
    let t = &mut file.train;
    if a.baseline {
        t.mode = Mode::Baseline;
    } else if a.lisa {
        t.mode = Mode::Lisa;
    }
    if let Some(h) = a.hook {
        file.model.decoder.hook = Some(h);
    }
    t.lisa.lambda = a.lambda.unwrap_or(t.lisa.lambda);
    t.lisa.target_space = a.target_space.unwrap_or(t.lisa.target_space);
    t.lisa.distance = a.distance.unwrap_or(t.lisa.distance);
    t.gradient_checkpointing |= a.gradient_checkpointing;
    t.proportion_empty_prompts = a.proportion_empty_prompts.unwrap_or(t.proportion_empty_prompts);
    t.optim.schedule = a.lr_scheduler.unwrap_or(t.optim.schedule);
    t.lisa_subbatch = a.lisa_subbatch.or(t.lisa_subbatch);
    t.decoder_lr_scale = a.decoder_lr_scale.unwrap_or(t.decoder_lr_scale);
    if a.normalize_tau && t.normalize_tau.is_none() {
        t.normalize_tau = Some(Default::default());
    }
    t.seed = a.seed.unwrap_or(t.seed);
    t.max_train_steps = a.max_train_steps.unwrap_or(t.max_train_steps);
    t.batch_size = a.train_batch_size.unwrap_or(t.batch_size);
    t.gradient_accumulation_steps = a.gradient_accumulation_steps.unwrap_or(t.gradient_accumulation_steps);
    t.optim.lr = a.learning_rate.unwrap_or(t.optim.lr);
    t.optim.warmup_steps = a.lr_warmup_steps.unwrap_or(t.optim.warmup_steps);
    t.optim.max_grad_norm = a.max_grad_norm.or(t.optim.max_grad_norm);
    if let Some(d) = &a.train_data_dir {
        file.data.dir = Some(d.clone());
    }
}

/// The run-file keys the flags of `lisa train` set, and whether the user gave each: an
/// invalid value is reported under the flag the user wrote.
fn flags_given(a: &TrainArgs) -> [(&'static str, &'static str, bool); 8] {
    [
        ("train.lisa.lambda", "--lambda", a.lambda.is_some()),
        ("train.lisa_subbatch", "--lisa-subbatch", a.lisa_subbatch.is_some()),
        ("train.decoder_lr_scale", "--decoder-lr-scale", a.decoder_lr_scale.is_some()),
        ("train.proportion_empty_prompts", "--proportion-empty-prompts", a.proportion_empty_prompts.is_some()),
        ("train.batch_size", "--train-batch-size", a.train_batch_size.is_some()),
        ("train.gradient_accumulation_steps", "--gradient-accumulation-steps", a.gradient_accumulation_steps.is_some()),
        ("train.optim.lr", "--learning-rate", a.learning_rate.is_some()),
        ("train.optim.max_grad_norm", "--max-grad-norm", a.max_grad_norm.is_some()),
    ]
}

/// The library's check of every training setting, before anything is loaded.
fn check_settings(a: &TrainArgs, file: &RunFile) -> Result<()> {
    file.train.validate_settings().map_err(|e| name_setting(e, &flags_given(a), a.config.as_deref()))
}

/// How a training run validates, saves and reports.
pub struct LoopOptions<'a> {
    /// Checkpoints, grids and metrics.jsonl go here.
    pub output_dir: &'a Path,
    /// Validate every N steps (0: only at the end).
    pub validation_steps: u64,
    /// Also validate before the first step (the prior alone: the side branch starts at zero).
    pub validate_at_start: bool,
    /// Checkpointing, resume and overwrite.
    pub checkpoints: CheckpointArgs,
    /// Name shown on the progress bar.
    pub label: &'a str,
    /// Validation of a latent-space model (condition images, prompts, the VAE that decodes).
    pub latent_validation: Option<LatentValidationFiles>,
}

/// The pretrained weights a training run starts from.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// The main network (a `lisa pretrain` prior, or a diffusers UNet folder).
    pub main: &'a Path,
    /// A side network in the architecture's native format to continue from.
    pub side: Option<&'a Path>,
}

/// Trains the side branch as `file` says, from `start`, on `device`, through the library's
/// training run ([`session::run`]). Everything that can be checked is checked before the
/// first step.
pub fn train_arm<B: Backend>(file: &RunFile, start: Start, device: B::Device, o: &LoopOptions) -> Result<RunReport> {
    let mode = file.train.mode;
    let parts = Parts::Dual { decoder: mode == Mode::Lisa };
    let mut built = registry::build::<B>(&file.model, parts, device, file.train.seed)?;
    built.load_main(start.main).with_context(|| format!("loading the main network {}", start.main.display()))?;
    if let Some(side) = start.side {
        built.load_side(side).with_context(|| format!("loading the side network {}", side.display()))?;
    }
    // Everything is checked on the model before the trainer allocates its optimizer state.
    let model = built.as_ref();
    let noise = &file.train.noise;
    // Pixel-space models validate by sampling and measuring; latent-space ones by sampling
    // the given pairs and decoding with their VAE (or not at all when none are given).
    let mut validator: Option<Box<dyn Validator<B>>> = match (&o.latent_validation, model.latent_space()) {
        (Some(v), true) => {
            let conditions = read_conditions(model, v)?;
            let vae = Vae::<B>::open(&v.vae, model.store().device().clone(), v.dtype)
                .with_context(|| format!("loading the VAE {}", v.vae.display()))?;
            let sampling = file.validation.sampling.clone();
            let validation = LatentValidation::new(model, noise, conditions, v.prompts.clone(), vae, sampling)?;
            Some(Box::new(validation))
        }
        (None, true) => {
            eprintln!("note: no --validation-image given: no validation images; losses are logged");
            None
        }
        (_, false) => {
            let set = file.validation_set(model.sample_shape()[1]);
            let validation =
                ToyValidation::new(model, noise, set, file.validation.sampling.clone(), file.validation.seed)?;
            Some(Box::new(validation))
        }
    };
    check_memory(model, file.train.batch_size)?;
    let data = file.open_training_set(model)?;
    check_example_fits(model, data.as_ref())?;
    let t = &file.train;
    let summary = format!(
        "train {} ({mode:?}, {}): {} examples, effective batch {} ({} x {}), {} steps, {} parameters trained, hook {}, lr {:.1e}",
        o.label,
        B::name(),
        data.len(),
        t.batch_size * t.gradient_accumulation_steps,
        t.batch_size,
        t.gradient_accumulation_steps,
        t.max_train_steps,
        model.store().count(true),
        model.spec().hook()?,
        t.optim.lr,
    );
    let c = &o.checkpoints;
    let options = RunOptions {
        output_dir: o.output_dir.to_path_buf(),
        validation_steps: o.validation_steps,
        validate_at_start: o.validate_at_start,
        checkpoints: c.policy(),
        resume: c.resume_from_checkpoint.clone(),
        rollback: c.rollback,
        overwrite: c.overwrite,
    };
    let mut trainer = Trainer::new(built, file.train.clone())?;
    let mut display = RunDisplay::new(o.label, o.output_dir, summary);
    let validator: Option<&mut dyn Validator<B>> = match &mut validator {
        Some(v) => Some(v.as_mut()),
        None => None,
    };
    Ok(session::run(&mut trainer, data.as_ref(), validator, &options, &mut display)?)
}

/// The data's images and condition images have the model's channels (checked on the first
/// example, before the folder is locked or anything trained).
fn check_example_fits<B: Backend>(model: &dyn DualDenoiser<B>, data: &dyn lisa_trainer::data::Dataset) -> Result<()> {
    let [c, h, w] = model.sample_shape();
    let [hc, hh, hw] = model.hint_shape();
    let e = data.get(0)?;
    if e.image.len() != c * h * w || e.hint.len() != hc * hh * hw {
        bail!(
            "the data has {}-channel images and {}-channel conditions; the model wants {c} and {hc}",
            e.image.len() / (h * w).max(1),
            e.hint.len() / (hh * hw).max(1),
        );
    }
    Ok(())
}

/// Runs `lisa train`.
pub fn run<B: Backend>(a: TrainArgs, device: B::Device) -> Result<()> {
    let mut file = RunFile::load(a.config.as_deref())?;
    apply(&a, &mut file);
    check_settings(&a, &file)?;
    let mut latent_validation = None;
    let (main, side) = match (&a.main, &a.pretrained_model_name_or_path) {
        (Some(main), _) => {
            file.resolve_model(main)?;
            (main.clone(), None)
        }
        (None, Some(dir)) => {
            let pipeline = Pipeline::open(dir)?;
            let data = file.data.dir.clone().context("--pretrained-model-name-or-path needs --train-data-dir")?;
            let downscale = match read_json_config(&dir.join("vae")) {
                Ok(c) => VaeConfig::from_json(&c)?.downscale(),
                Err(_) => SD_VAE_DOWNSCALE,
            };
            let sample_size = UNetConfig::from_unet_json(&pipeline.unet)?.sample_size;
            let resolution = a.resolution.unwrap_or(sample_size * downscale);
            let latent_side = latent_side(resolution, downscale).context("--resolution")?;
            let (images, prompts) = validation_pairs(&a.validation_image, &a.validation_prompt)?;
            let cache_dir = a.cache_dir.clone().unwrap_or_else(|| a.output_dir.join("cache"));
            let precision = a.mixed_precision;
            let cache =
                sd_cache::prepare::<B>(&pipeline, &data, &cache_dir, resolution, &prompts, precision, device.clone())?;
            let inputs = SdInputs {
                embeddings: cache.embeddings,
                latents: cache.latents,
                latent_size: a.resolution.map(|_| latent_side),
                mixed_precision: precision,
            };
            file.use_diffusers(&pipeline, a.controlnet_model_name_or_path.as_deref(), inputs)?;
            if !images.is_empty() {
                latent_validation =
                    Some(LatentValidationFiles { images, prompts, vae: dir.join("vae"), dtype: precision.dtype() });
            }
            (pipeline.unet_dir(), a.controlnet_model_name_or_path.clone())
        }
        (None, None) => bail!("give --main (a lisa prior) or --pretrained-model-name-or-path (a diffusers folder)"),
    };
    let options = LoopOptions {
        output_dir: &a.output_dir,
        validation_steps: a.validation_steps,
        validate_at_start: false,
        latent_validation,
        checkpoints: a.checkpoints.clone(),
        label: if file.train.mode == Mode::Lisa { "lisa" } else { "baseline" },
    };
    let report = train_arm::<B>(&file, Start { main: &main, side: side.as_deref() }, device, &options)?;
    let iou = report.final_score().map_or("none (no validation)".to_string(), |v| format!("{v:.4}"));
    eprintln!(
        "done in {:.1} min (training {:.1} min); final iou {iou}; outputs in {}",
        report.wall_seconds / 60.0,
        report.train_seconds / 60.0,
        a.output_dir.display()
    );
    Ok(())
}
