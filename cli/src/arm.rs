//! One training arm from a run file to its report: everything checked, the model built (or
//! taken), its validator, its data, then the library's training run. What `train`, `demo`,
//! `study` and the ranks of a data-parallel run share.

use std::path::Path;

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::model::sd::Vae;
use lisa_trainer::model::{DualDenoiser, registry};
use lisa_trainer::session::{self, RunOptions, RunReport};
use lisa_trainer::train::Trainer;
use lisa_trainer::validation::{LatentValidation, ToyValidation, Validator};

use crate::config::{RunFile, check_memory};
use crate::control_score::{CircleScore, ConditionKind, ControlMetric, EdgeScore, condition_kind};
use crate::pipeline_start::mode_parts;
use crate::progress::RunDisplay;
use crate::run_dir::CheckpointArgs;
use crate::sd_validation::{LatentValidationFiles, read_conditions, read_rgb};

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
    /// `--report-to tensorboard`: the folder its event files go to (None: no TensorBoard).
    pub tensorboard: Option<std::path::PathBuf>,
    /// Samples per validation pair of a pipeline run (`--num-validation-images`).
    pub validation_samples: usize,
    /// The control metric of a pipeline run's validations (`--control-metric`).
    pub control_metric: ControlMetric,
}

/// What a training run starts from.
pub enum Start<'a, B: Backend> {
    /// Weights files: the main network (a `lisa pretrain` prior) and, optionally, a side
    /// network in the architecture's native format to continue from.
    Files {
        /// The main network.
        main: &'a Path,
        /// The side network.
        side: Option<&'a Path>,
    },
    /// A model built and loaded already (from a diffusers pipeline, before its inputs were
    /// encoded), with the parts `file.train.mode` needs.
    Built(Box<dyn DualDenoiser<B>>),
}

/// Trains the side branch as `file` says, from `start`, on `device`, through the library's
/// training run ([`session::run`]). Everything that can be checked is checked before the
/// first step.
pub fn train_arm<B: Backend>(file: &RunFile, start: Start<B>, device: B::Device, o: &LoopOptions) -> Result<RunReport> {
    let mut arm = prepare_arm(file, start, device, o)?;
    let mut trainer = Trainer::new(arm.built, file.train.clone())?;
    let mut display = RunDisplay::new(o.label, o.output_dir, arm.summary).with_tensorboard(o.tensorboard.clone());
    let validator: Option<&mut dyn Validator<B>> = match &mut arm.validator {
        Some(v) => Some(v.as_mut()),
        None => None,
    };
    Ok(session::run(&mut trainer, arm.data.as_ref(), validator, &arm.options, &mut display)?)
}

/// A run checked and ready for its first step: the model, its validator, its data, the run's
/// options and the summary line the display starts with.
pub struct Arm<B: Backend> {
    /// The model, built and loaded.
    pub built: Box<dyn DualDenoiser<B>>,
    /// What validates it (None: nothing to validate with).
    pub validator: Option<Box<dyn Validator<B>>>,
    /// The training set.
    pub data: Box<dyn lisa_trainer::data::Dataset>,
    /// Cadence, checkpoints, resume.
    pub options: RunOptions,
    /// The start summary.
    pub summary: String,
}

/// Everything [`train_arm`] does before the trainer exists, every check included.
pub fn prepare_arm<B: Backend>(file: &RunFile, start: Start<B>, device: B::Device, o: &LoopOptions) -> Result<Arm<B>> {
    let mode = file.train.mode;
    let parts = mode_parts(mode);
    let built = match start {
        Start::Files { main, side } => {
            let mut built = registry::build::<B>(&file.model, parts, device, file.train.seed)?;
            built.load_main(main).with_context(|| format!("loading the main network {}", main.display()))?;
            if let Some(side) = side {
                built.load_side(side).with_context(|| format!("loading the side network {}", side.display()))?;
            }
            built
        }
        Start::Built(built) if built.parts() == parts => built,
        Start::Built(_) => bail!("internal error (a bug in lisa): a model built with other parts than {mode:?} trains"),
    };
    // Everything is checked on the model before the trainer allocates its optimizer state.
    let model = built.as_ref();
    let noise = &file.train.noise;
    // Pixel-space models validate by sampling and measuring; latent-space ones by sampling
    // the given pairs and decoding with their VAE (or not at all when none are given).
    let validator: Option<Box<dyn Validator<B>>> = match (&o.latent_validation, model.latent_space()) {
        (Some(v), true) => {
            let vae = Vae::<B>::open(&v.vae, model.store().device().clone(), v.dtype)
                .with_context(|| format!("loading the VAE {}", v.vae.display()))?;
            let sampling = file.validation.sampling.clone();
            let prompts = v.prompts.clone();
            let validation = if model.latent_hints() {
                // The condition images through the VAE, from pixels as training takes them:
                // in [0, 1] (SD3) or [−1, 1] (Flux).
                let side = model.sample_shape()[1] * vae.config().downscale();
                let images = read_rgb(v, side)?;
                let pixels: Vec<f32> = match v.signed_hints {
                    true => images.iter().map(|x| 2.0 * x - 1.0).collect(),
                    false => images.clone(),
                };
                let hints = vae.latents(&pixels, v.images.len(), side)?;
                let kind = condition_kind(&images, [3, side, side]);
                let shown = (images, [3, side, side]);
                (LatentValidation::with_latent_hints(model, noise, hints, shown, prompts, vae, sampling)?, kind)
            } else {
                let conditions = read_conditions(model, v)?;
                let kind = condition_kind(&conditions, model.hint_shape());
                (LatentValidation::new(model, noise, conditions, prompts, vae, sampling)?, kind)
            };
            let (validation, kind) = validation;
            let validation = validation.with_samples_per_pair(o.validation_samples)?;
            let pairs = format!("{} pair(s) × {} seed(s)", v.images.len(), o.validation_samples);
            let measured = "in metrics.jsonl";
            let validation = match (o.control_metric, kind) {
                (ControlMetric::Circles, _) | (ControlMetric::Auto, ConditionKind::Outlines) => {
                    eprintln!(
                        "control metric at every validation: the IoU of each sample's disc-coloured region with the disc its outline encloses, and the F1 and SSIM of its Canny edges ({pairs}; circle_iou, control_f1, control_ssim {measured})"
                    );
                    validation.with_score(Box::new(CircleScore))
                }
                (ControlMetric::Edges, _) | (ControlMetric::Auto, ConditionKind::Edges) => {
                    eprintln!(
                        "control metric at every validation: the pixel F1 and SSIM of each sample's Canny edges against its condition ({pairs}; control_f1, control_ssim {measured})"
                    );
                    validation.with_score(Box::new(EdgeScore))
                }
                (ControlMetric::Auto, ConditionKind::Other) => {
                    eprintln!(
                        "note: no control metric: the validation conditions are not edge maps (lisa measures edge conditions: Canny, HED, line art, outlines); validation grids only ({pairs})"
                    );
                    validation
                }
                (ControlMetric::None, _) => validation,
            };
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
    Ok(Arm { built, validator, data, options, summary })
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
