//! `lisa train`: the side branch, with LISA or the baseline objective.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_core::{Distance, TargetSpace};
use lisa_trainer::checkpoint::{load_checkpoint, save_checkpoint};
use lisa_trainer::data::{Dataset, FillCircles};
use lisa_trainer::model::{DualDenoiser, NATIVE_SIDE_DIR, Parts, registry};
use lisa_trainer::probe::{ridge_probe, side_features};
use lisa_trainer::tau_share::{TauShare, tau_shares};
use lisa_trainer::train::{Mode, Trainer};
use lisa_trainer::weights::write_atomic;

use crate::config::{RunFile, SdInputs, check_memory};
use crate::eval::validate;
use crate::image::save_png;
use crate::progress::Progress;
use crate::run_dir::{CheckpointArgs, RunDir};
use crate::sd_cache;
use crate::sd_validation::{LatentValidation, read_conditions, validate_latent, validation_pairs};
use lisa_trainer::model::sd::{MixedPrecision, Pipeline, UNetConfig, Vae, VaeConfig, read_json_config};

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
    mixed_precision: String,
    /// Train with the LISA term (the default).
    #[arg(long, conflicts_with = "baseline")]
    lisa: bool,
    /// Train the plain ControlNet baseline (no decoder, no prior pass).
    #[arg(long)]
    baseline: bool,
    /// Side layer the LISA decoder reads: down_0 .. down_N | mid.
    #[arg(long)]
    hook: Option<String>,
    /// λ, the weight of the LISA term.
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f64>,
    /// prediction | score.
    #[arg(long)]
    target_space: Option<String>,
    /// mse | cosine.
    #[arg(long)]
    distance: Option<String>,
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
    lr_scheduler: Option<String>,
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

/// Applies the flags to the run file.
fn apply(a: &TrainArgs, file: &mut RunFile) -> Result<()> {
    let t = &mut file.train;
    if a.baseline {
        t.mode = Mode::Baseline;
    } else if a.lisa {
        t.mode = Mode::Lisa;
    }
    if let Some(h) = &a.hook {
        file.model.decoder.hook = h.parse().context("--hook")?;
    }
    if let Some(l) = a.lambda {
        if !(l >= 0.0 && l.is_finite()) {
            bail!("--lambda must be finite and >= 0, got {l}");
        }
        t.lisa.lambda = l;
    }
    if let Some(s) = &a.target_space {
        t.lisa.target_space = match s.as_str() {
            "prediction" => TargetSpace::Prediction,
            "score" => TargetSpace::Score,
            _ => bail!("--target-space {s:?}: prediction | score"),
        };
    }
    if let Some(d) = &a.distance {
        t.lisa.distance = match d.as_str() {
            "mse" => Distance::Mse,
            "cosine" => Distance::Cosine,
            _ => bail!("--distance {d:?}: mse | cosine"),
        };
    }
    if a.gradient_checkpointing {
        t.gradient_checkpointing = true;
    }
    if let Some(p) = a.proportion_empty_prompts {
        if !(0.0..=1.0).contains(&p) {
            bail!("--proportion-empty-prompts must lie in [0, 1], got {p}");
        }
        t.proportion_empty_prompts = p;
    }
    if let Some(s) = &a.lr_scheduler {
        t.optim.schedule = s.parse().context("--lr-scheduler")?;
    }
    t.lisa_subbatch = a.lisa_subbatch.or(t.lisa_subbatch);
    if let Some(f) = a.decoder_lr_scale {
        if !(f > 0.0 && f.is_finite()) {
            bail!("--decoder-lr-scale must be > 0 and finite, got {f}");
        }
        t.decoder_lr_scale = f;
    }
    if a.normalize_tau && t.normalize_tau.is_none() {
        t.normalize_tau = Some(Default::default());
    }
    if let Some(d) = &a.train_data_dir {
        file.data.dir = Some(d.clone());
    }
    let t = &mut file.train;
    t.seed = a.seed.unwrap_or(t.seed);
    t.max_train_steps = a.max_train_steps.unwrap_or(t.max_train_steps);
    t.batch_size = a.train_batch_size.unwrap_or(t.batch_size);
    t.gradient_accumulation_steps = a.gradient_accumulation_steps.unwrap_or(t.gradient_accumulation_steps);
    t.optim.lr = a.learning_rate.unwrap_or(t.optim.lr);
    t.optim.warmup_steps = a.lr_warmup_steps.unwrap_or(t.optim.warmup_steps);
    if let Some(c) = a.max_grad_norm {
        t.optim.max_grad_norm = Some(c);
    }
    Ok(())
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
    pub latent_validation: Option<LatentValidation>,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct ArmReport {
    /// `(step, IoU)` of every validation.
    pub validations: Vec<(u64, f32)>,
    /// `(step, loss, main loss, LISA loss)` of every step.
    pub losses: Vec<(u64, f32, f32, f32)>,
    /// Seconds spent in training steps (validation excluded).
    pub train_seconds: f64,
    /// Wall-clock seconds of the whole run.
    pub wall_seconds: f64,
}

impl ArmReport {
    /// The IoU of the last validation.
    pub fn final_iou(&self) -> Option<f32> {
        self.validations.last().map(|v| v.1)
    }

    /// The first validated step whose IoU reached `threshold`.
    pub fn steps_to(&self, threshold: f32) -> Option<u64> {
        self.validations.iter().find(|v| v.1 >= threshold).map(|v| v.0)
    }
}

/// The pretrained weights a training run starts from.
#[derive(Debug, Clone, Copy)]
pub struct Start<'a> {
    /// The main network (a `lisa pretrain` prior, or a diffusers UNet folder).
    pub main: &'a Path,
    /// A side network in the architecture's native format to continue from.
    pub side: Option<&'a Path>,
}

/// Trains the side branch as `file` says, from `start`, on `device`. Everything that can be
/// checked is checked before the first step.
pub fn train_arm<B: Backend>(file: &RunFile, start: Start, device: B::Device, o: &LoopOptions) -> Result<ArmReport> {
    let mode = file.train.mode;
    let parts = Parts::Dual { decoder: mode == Mode::Lisa };
    let mut model = registry::build::<B>(&file.model, parts, device, file.train.seed)?;
    let main = start.main;
    model.load_main(main).with_context(|| format!("loading the main network {}", main.display()))?;
    if let Some(side) = start.side {
        model.load_side(side).with_context(|| format!("loading the side network {}", side.display()))?;
    }
    // Pixel-space models validate by sampling and measuring; latent-space ones by sampling
    // the given pairs and decoding with their VAE (or not at all when none are given).
    let validates = !model.latent_space();
    let latent = match (&o.latent_validation, model.latent_space()) {
        (Some(v), true) => {
            let conditions = read_conditions(model.as_ref(), v)?;
            let vae = Vae::<B>::open(&v.vae, model.store().device().clone(), v.dtype)
                .with_context(|| format!("loading the VAE {}", v.vae.display()))?;
            Some((v, conditions, vae))
        }
        (None, true) => {
            eprintln!("note: no --validation-image given: no validation images; losses are logged");
            None
        }
        _ => None,
    };
    file.check_sampling(model.as_ref())?;
    check_memory(model.as_ref(), file.train.batch_size)?;
    let data = file.open_training_set(model.as_ref())?;
    check_example_fits(model.as_ref(), data.as_ref())?;
    let val_set = file.validation_set(model.sample_shape()[1]);
    let mut trainer = Trainer::new(model, file.train.clone())?;
    let dir = RunDir::lock(o.output_dir)?;
    let out = dir.path();
    let metrics_path = out.join("metrics.jsonl");
    let c = &o.checkpoints;
    if let Some(named) = &c.resume_from_checkpoint {
        let ckpt = dir.resume_target(named)?;
        load_checkpoint(&mut trainer, data.as_ref(), &ckpt)?;
        dir.refuse_others(&trainer.run_id, &[], false)?;
        keep_metrics_until(&metrics_path, &trainer.run_id, trainer.run.state.step)?;
        eprintln!("resumed from {} at step {}", ckpt.display(), trainer.run.state.step);
    } else {
        // Outputs a new run writes: another run's are refused (or removed with --overwrite).
        dir.refuse_others(&trainer.run_id, &[metrics_path.clone(), out.join(NATIVE_SIDE_DIR)], c.overwrite)?;
        if metrics_path.exists() {
            std::fs::remove_file(&metrics_path)
                .with_context(|| format!("cannot replace {}", metrics_path.display()))?;
        }
    }
    let t = &file.train;
    eprintln!(
        "train {} ({mode:?}, {}): {} examples, effective batch {} ({} x {}), {} steps, {} parameters trained, hook {}, lr {:.1e}",
        o.label,
        B::name(),
        data.len(),
        t.batch_size * t.gradient_accumulation_steps,
        t.batch_size,
        t.gradient_accumulation_steps,
        t.max_train_steps,
        trainer.model.store().count(true),
        file.model.decoder.hook,
        t.optim.lr,
    );
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;
    let mut write_metrics = |line: serde_json::Value| {
        writeln!(metrics, "{line}").with_context(|| format!("cannot write {}", metrics_path.display()))
    };
    let wall = Instant::now();
    let mut report = ArmReport::default();
    let first = trainer.run.state.step;
    let mut progress = Progress::new(o.label, first, t.max_train_steps);
    let run_id = trainer.run_id.clone();
    let val_examples = (0..val_set.len).map(|i| val_set.get(i)).collect::<lisa_trainer::error::Result<Vec<_>>>()?;
    // The linear probe's examples: their own circles, not the validation set's.
    let probe_set = FillCircles { len: PROBE_EXAMPLES, seed: val_set.seed.wrapping_add(1), ..val_set.clone() };
    let probe_examples =
        (0..probe_set.len).map(|i| probe_set.get(i)).collect::<lisa_trainer::error::Result<Vec<_>>>()?;
    let probe_targets: Vec<Vec<f64>> = (0..probe_set.len)
        .map(|i| probe_set.circle(i))
        .map(|c| vec![c.cx as f64, c.cy as f64, c.radius as f64])
        .collect();
    // IoU, colour error and the shares of τ per timestep bucket of one validation.
    let validate_now = |trainer: &Trainer<B>, step: u64, report: &mut ArmReport| -> Result<(f32, f32, TauShares)> {
        let v = validate(trainer.model.as_ref(), &t.noise, &val_set, &file.validation.sampling)?;
        save_png(&v.grid, &out.join(format!("validation-{step:06}.png")))?;
        report.validations.push((step, v.iou));
        let norm = trainer.measured_tau_norm();
        let shares = tau_shares(
            trainer.model.as_ref(),
            &t.lisa,
            &t.noise,
            norm,
            &val_examples,
            TAU_BUCKETS,
            file.validation.seed,
        )?;
        let hook = file.model.decoder.hook;
        let (features, dim) =
            side_features(trainer.model.as_ref(), hook, &t.noise, &probe_examples, PROBE_T, file.validation.seed)?;
        let probe = ridge_probe(&features, dim, &probe_targets)?;
        Ok((v.iou, v.colour_error, TauShares(shares, probe.r2)))
    };
    if let Some(norm) = trainer.tau_norm(data.as_ref())? {
        let rms: Vec<String> = norm.rms().iter().map(|r| format!("{r:.3}")).collect();
        println!("{}: τ's scale per timestep bucket, low noise first: {}", o.label, rms.join(" "));
    }
    if o.validate_at_start && first == 0 && validates {
        let (iou, colour, shares) = validate_now(&trainer, 0, &mut report)?;
        progress.validation(0, iou);
        let mut row = serde_json::json!({"step": 0, "iou": iou, "colour_error": colour, "run": run_id});
        shares.write_into(&mut row);
        write_metrics(row)?;
    }
    while trainer.run.state.step < t.max_train_steps {
        let step_start = Instant::now();
        let s = trainer.step(data.as_ref())?;
        report.train_seconds += step_start.elapsed().as_secs_f64();
        report.losses.push((s.step, s.loss, s.main_loss, s.lisa_loss));
        let its = (s.step - first) as f64 / report.train_seconds;
        let last = s.step == t.max_train_steps;
        let (mut iou, mut colour, mut shares) = (None, None, None);
        let due = (o.validation_steps > 0 && s.step % o.validation_steps == 0) || last;
        if let (Some((v, conditions, vae)), true) = (&latent, due) {
            let grid =
                validate_latent(trainer.model.as_ref(), &t.noise, v, conditions, vae, &file.validation.sampling)?;
            save_png(&grid, &out.join(format!("validation-{:06}.png", s.step)))?;
        }
        if validates && due {
            let (v, c, tau) = validate_now(&trainer, s.step, &mut report)?;
            progress.validation(s.step, v);
            (iou, colour, shares) = (Some(v), Some(c), Some(tau));
        }
        progress.step(&s, its);
        let mut row = serde_json::json!({"step": s.step, "loss": s.loss, "main_loss": s.main_loss, "lisa_loss": s.lisa_loss, "lisa_zero_distance": s.lisa_zero_distance, "grad_norm": s.grad_norm, "lr": s.lr, "steps_per_s": its, "iou": iou, "colour_error": colour});
        if let Some(shares) = shares {
            shares.write_into(&mut row);
        }
        write_metrics(row)?;
        if c.saves_at(s.step, t.max_train_steps) {
            save_checkpoint(&trainer, data.as_ref(), &out.join(format!("checkpoint-{}", s.step)))?;
            if let Some(limit) = c.checkpoints_total_limit {
                dir.prune(&trainer.run_id, limit)?;
            }
        }
    }
    report.wall_seconds = wall.elapsed().as_secs_f64();
    progress.finish(report.wall_seconds);
    let native = out.join(NATIVE_SIDE_DIR);
    if trainer.model.export_side(&native)? {
        eprintln!("the trained side network, in its native format: {}", native.display());
    }
    Ok(report)
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

/// Drops the lines of `metrics.jsonl` past `step` (a resumed run writes them again); a file
/// with another run's lines is refused, not cut.
fn keep_metrics_until(path: &Path, run_id: &str, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let other = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| v.get("run").and_then(|r| r.as_str()).is_some_and(|r| r != run_id));
    if other {
        bail!("{} holds another run's metrics; resume a run in its own output folder", path.display());
    }
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step")?.as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())?;
    Ok(())
}

/// Runs `lisa train`.
pub fn run<B: Backend>(a: TrainArgs, device: B::Device) -> Result<()> {
    let mut file = RunFile::load(a.config.as_deref())?;
    let hook_given = a.hook.is_some() || file.decoder_given;
    apply(&a, &mut file)?;
    let mut latent_validation = None;
    let (main, side) = match (&a.main, &a.pretrained_model_name_or_path) {
        (Some(main), _) => {
            file.resolve_model(main)?;
            (main.clone(), None)
        }
        (None, Some(dir)) => {
            let pipeline = Pipeline::open(dir)?;
            let data = file.data.dir.clone().context("--pretrained-model-name-or-path needs --train-data-dir")?;
            let vae_factor = match read_json_config(&dir.join("vae")) {
                Ok(c) => VaeConfig::from_json(&c)?.downscale(),
                Err(_) => 8,
            };
            let sample_size = UNetConfig::from_unet_json(&pipeline.unet)?.sample_size;
            let resolution = a.resolution.unwrap_or(sample_size * vae_factor);
            if resolution == 0 || !resolution.is_multiple_of(vae_factor) {
                bail!("--resolution {resolution} must be a positive multiple of the VAE's downscale {vae_factor}");
            }
            let (images, prompts) = validation_pairs(&a.validation_image, &a.validation_prompt)?;
            let cache_dir = a.cache_dir.clone().unwrap_or_else(|| a.output_dir.join("cache"));
            let precision: MixedPrecision = a.mixed_precision.parse().context("--mixed-precision")?;
            let cache =
                sd_cache::prepare::<B>(&pipeline, &data, &cache_dir, resolution, &prompts, precision, device.clone())?;
            let inputs = SdInputs {
                embeddings: cache.embeddings,
                latents: cache.latents,
                latent_size: a.resolution.map(|r| r / vae_factor),
                hook_given,
                mixed_precision: precision,
            };
            file.use_diffusers(&pipeline, a.controlnet_model_name_or_path.as_deref(), inputs)?;
            if !images.is_empty() {
                latent_validation =
                    Some(LatentValidation { images, prompts, vae: dir.join("vae"), dtype: precision.dtype() });
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
    let iou = report.final_iou().map_or("none (no validation)".to_string(), |v| format!("{v:.4}"));
    eprintln!(
        "done in {:.1} min (training {:.1} min); final iou {iou}; outputs in {}",
        report.wall_seconds / 60.0,
        report.train_seconds / 60.0,
        a.output_dir.display()
    );
    Ok(())
}

/// Timestep buckets of the τ shares logged with every validation of the toy.
pub const TAU_BUCKETS: usize = 5;

/// Examples of the linear probe from side features to the circle (trainer/src/probe.rs).
pub const PROBE_EXAMPLES: usize = 256;
/// The timestep fraction t/T at which the probe reads the side features.
pub const PROBE_T: f32 = 0.5;

/// One validation's analysis: the shares of τ per timestep bucket (trainer/src/tau_share.rs)
/// and the linear probe's held-out R² for the circle's centre x, centre y and radius.
struct TauShares(Vec<TauShare>, Vec<f64>);

impl TauShares {
    /// Adds `tau_zero_distance`, `tau_share_decoder` (null entries without a decoder) and
    /// `tau_share_control` to a metrics row (one value per bucket, low timesteps first), and
    /// `probe_r2` (centre x, centre y, radius).
    fn write_into(&self, row: &mut serde_json::Value) {
        let column = |f: fn(&TauShare) -> Option<f32>| self.0.iter().map(f).collect::<Vec<_>>();
        row["tau_zero_distance"] = serde_json::json!(column(|s| Some(s.zero_distance)));
        row["tau_share_decoder"] = serde_json::json!(column(|s| s.decoder));
        row["tau_share_control"] = serde_json::json!(column(|s| Some(s.control)));
        row["probe_r2"] = serde_json::json!(self.1);
    }
}
