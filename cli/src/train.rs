//! `lisa train`: the side branch, with LISA or the baseline objective.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_core::{Distance, TargetSpace};
use lisa_trainer::model::DualDenoiser;
use lisa_trainer::model::HookLayer;
use lisa_trainer::model::flux::FluxPipeline;
use lisa_trainer::model::sd::{MixedPrecision, Pipeline, SdSpec};
use lisa_trainer::model::sd3::Sd3Pipeline;
use lisa_trainer::optim::LrSchedule;
use lisa_trainer::train::Mode;

use crate::arm::{LoopOptions, Start};
use crate::config::{RunFile, name_setting};
use crate::control_score::ControlMetric;
use crate::parallel::{Plan, RankBackend, train_ranks};
use crate::pipeline_start::{SdStart, mixed_precision_note, mode_parts};
use crate::run_dir::CheckpointArgs;
use crate::sd_cache;
use crate::sd_validation::{LatentValidationFiles, read_conditions};
use crate::train_data::TrainData;

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
    /// ControlNet for its UNet (the sd architecture, SDXL included; latents and text
    /// embeddings precomputed); or an SD3 / SD3.5 folder (transformer/, scheduler/, …: the sd3
    /// architecture), or a Flux folder (the flux architecture).
    #[arg(long, conflicts_with = "main")]
    pretrained_model_name_or_path: Option<PathBuf>,
    /// A diffusers ControlNet folder to start from (default: a copy of the UNet's encoder).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    controlnet_model_name_or_path: Option<PathBuf>,
    /// A diffusers VAE folder used in place of the pipeline's vae/ (SDXL users give one that
    /// does not overflow in fp16, such as sdxl-vae-fp16-fix).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    pretrained_vae_model_name_or_path: Option<PathBuf>,
    /// SDXL: the crop's top edge recorded in the time ids (pixels).
    #[arg(long, default_value_t = 0, requires = "pretrained_model_name_or_path")]
    crops_coords_top_left_h: usize,
    /// SDXL: the crop's left edge recorded in the time ids (pixels).
    #[arg(long, default_value_t = 0, requires = "pretrained_model_name_or_path")]
    crops_coords_top_left_w: usize,
    /// Training resolution in pixels (images resized and centre-cropped to it; default: the
    /// UNet's sample_size × the VAE's downscale).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    resolution: Option<usize>,
    /// Where the latents and text embeddings are cached (computed once per dataset with the
    /// pipeline's VAE and text encoder; default: OUTPUT_DIR/cache).
    #[arg(long)]
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
    /// Keep an exponential moving average of the ControlNet's weights, updated after every
    /// optimizer step (diffusers' EMAModel warm-up), kept in checkpoints, used for validation
    /// and saved beside the ControlNet as OUTPUT_DIR/controlnet_ema.
    #[arg(long)]
    use_ema: bool,
    /// The EMA's decay (default 0.9999, diffusers' EMAModel's; the warm-up min(decay,
    /// (1 + s)/(10 + s)) keeps early steps from lingering).
    #[arg(long, allow_negative_numbers = true)]
    ema_decay: Option<f32>,
    /// no | fp16 | bf16: the frozen UNet, VAE and text encoder stored in half precision; the
    /// ControlNet, the LISA decoder and the optimizer state stay in f32.
    #[arg(long, default_value = "no", requires = "pretrained_model_name_or_path")]
    mixed_precision: MixedPrecision,
    /// SD3: how training times are drawn or the loss weighted: logit_normal | mode |
    /// sigma_sqrt | cosmap | none (train_controlnet_sd3.py's, logit_normal by default).
    #[arg(long, requires = "pretrained_model_name_or_path")]
    weighting_scheme: Option<String>,
    /// SD3: the logit-normal's mean.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    logit_mean: f64,
    /// SD3: the logit-normal's standard deviation.
    #[arg(long, default_value_t = 1.0)]
    logit_std: f64,
    /// SD3: the mode density's scale.
    #[arg(long, default_value_t = 1.29, allow_negative_numbers = true)]
    mode_scale: f64,
    /// SD3: 1 to precondition the outputs (the loss of x_t − σ·pred against x₀), 0 not to.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    precondition_outputs: u8,
    /// SD3 and Flux: T5 tokens per prompt (default 77 for SD3, as train_controlnet_sd3.py; 512
    /// for Flux, as its pipeline).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Flux: double-stream blocks of a ControlNet made from the transformer (default 4,
    /// train_controlnet_flux.py's).
    #[arg(long)]
    num_double_layers: Option<usize>,
    /// Flux: single-stream blocks of a ControlNet made from the transformer (default 4).
    #[arg(long)]
    num_single_layers: Option<usize>,
    /// Flux-dev: the guidance scale the transformer is given in training (default 3.5).
    #[arg(long, allow_negative_numbers = true)]
    guidance_scale: Option<f32>,
    /// Flux union ControlNet (`num_mode` in its config): the control type of every training
    /// and validation sample (0 .. num_mode − 1).
    #[arg(long)]
    control_mode: Option<usize>,
    /// SD3: condition channels beyond the latents' of a ControlNet made from the transformer.
    #[arg(long, default_value_t = 0)]
    num_extra_conditioning_channels: usize,
    /// SD3: blocks of a ControlNet made from the transformer (default 12, diffusers').
    #[arg(long)]
    controlnet_num_layers: Option<usize>,
    /// Train with the LISA term (the default).
    #[arg(long, conflicts_with = "baseline")]
    lisa: bool,
    /// Train the plain ControlNet baseline (no decoder, no prior pass).
    #[arg(long)]
    baseline: bool,
    /// Side layer the LISA decoder reads: down_0 .. down_N | mid, or block_0 .. block_N for
    /// SD3 and Flux, single_block_0 .. single_block_N for Flux (default: the architecture's,
    /// down_1 for the toy, down_5 for Stable Diffusion, block_0 for SD3 and Flux).
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
    /// A Hugging Face `datasets` dataset to train on instead: a save_to_disk folder, a folder
    /// of .parquet files (the Hub's layout; the train split), or one .parquet / .arrow file.
    /// Converted once into the cache (CACHE_DIR/datasets/).
    #[arg(long, conflicts_with = "train_data_dir")]
    dataset_name: Option<PathBuf>,
    /// webdataset tar shards to train on instead ('DIR/{00000..00099}.tar': {a..b} ranges
    /// and {x,y} lists expand as webdataset's do). Indexed once into the cache; the images are
    /// read from the shards in place.
    #[arg(long, conflicts_with_all = ["train_data_dir", "dataset_name"])]
    train_shards: Option<String>,
    /// The target images: a --dataset-name column (default: the first column) or a
    /// --train-shards part (default: jpg, jpeg or png).
    #[arg(long)]
    image_column: Option<String>,
    /// The condition images: a --dataset-name column (default: the third column) or a
    /// --train-shards part (default: conditioning.png, conditioning.jpg, cond.png, cond.jpg,
    /// hint.png or hint.jpg).
    #[arg(long)]
    conditioning_image_column: Option<String>,
    /// The prompts: a --dataset-name column (default: the second column) or a --train-shards
    /// part (default: txt).
    #[arg(long)]
    caption_column: Option<String>,
    /// Skip (and count) the rows of --dataset-name or --train-shards that cannot be read (a
    /// null, an image lisa cannot read, a missing part) instead of stopping at the first.
    #[arg(long)]
    skip_bad_rows: bool,
    /// Where checkpoints, grids and metrics.jsonl go.
    #[arg(long, default_value = "runs/train")]
    output_dir: PathBuf,
    /// Samples per validation image, with the seeds seed, seed + 1, … (train_controlnet.py's
    /// --num_validation_images): each grid row shows them, the control metric averages them.
    #[arg(long, default_value_t = 4)]
    num_validation_images: usize,
    /// The control metric of each validation: auto (edge F1 and SSIM when the validation
    /// images are edge maps, else none, said once), edges, none.
    #[arg(long, value_enum, default_value_t = ControlMetric::Auto)]
    control_metric: ControlMetric,
    /// Also report the losses, learning rate, speed, validation metrics and grids to
    /// TensorBoard (event files in OUTPUT_DIR/LOGGING_DIR/TRACKER_PROJECT_NAME;
    /// metrics.jsonl is written either way).
    #[arg(long, value_enum, default_value_t = ReportTo::None)]
    report_to: ReportTo,
    /// The TensorBoard folder, under --output-dir unless absolute (train_controlnet.py's).
    #[arg(long, default_value = "logs")]
    logging_dir: PathBuf,
    /// The TensorBoard run's name, a folder under --logging-dir (train_controlnet.py's).
    #[arg(long, default_value = "train_controlnet")]
    tracker_project_name: String,
    /// Train on N GPUs of this machine, one thread each (data-parallel: each takes
    /// --train-batch-size examples of every step, gradients averaged with NCCL). With the CPU
    /// or wgpu backend the N ranks share the one device. A run started by torchrun or srun
    /// (RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS set) is one process per GPU instead.
    #[arg(long)]
    gpus: Option<usize>,
    /// Seconds a rank waits for the others (at the rendezvous, at each all-reduce) before it
    /// ends the run with an error.
    #[arg(long, default_value_t = 1800)]
    collective_timeout: u64,
}

/// Where a run reports besides metrics.jsonl.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportTo {
    /// metrics.jsonl only.
    None,
    /// TensorBoard event files too.
    Tensorboard,
}

/// `--use-ema`'s decay when neither `--ema-decay` nor the run file gives one (diffusers'
/// `EMAModel` default).
const DEFAULT_EMA_DECAY: f32 = 0.9999;

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
    // --ema-decay alone sets the decay of an EMA the run file keeps (check_settings refuses it
    // otherwise).
    if a.use_ema || t.ema_decay.is_some() {
        t.ema_decay = Some(a.ema_decay.or(t.ema_decay).unwrap_or(DEFAULT_EMA_DECAY));
    }
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
fn flags_given(a: &TrainArgs) -> [(&'static str, &'static str, bool); 9] {
    [
        ("train.ema_decay", "--ema-decay", a.ema_decay.is_some()),
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
    if a.ema_decay.is_some() && file.train.ema_decay.is_none() {
        bail!("--ema-decay sets the decay of an EMA: give --use-ema too (or [train] ema_decay in the run file)");
    }
    if a.cache_dir.is_some()
        && a.pretrained_model_name_or_path.is_none()
        && a.dataset_name.is_none()
        && a.train_shards.is_none()
    {
        bail!(
            "--cache-dir holds a pipeline run's inputs or a converted dataset: it is for --pretrained-model-name-or-path, --dataset-name or --train-shards"
        );
    }
    let max = lisa_trainer::validation::MAX_SAMPLES_PER_PAIR;
    if !(1..=max).contains(&a.num_validation_images) {
        bail!("--num-validation-images {}: 1..={max} samples per validation image", a.num_validation_images);
    }
    let project = &a.tracker_project_name;
    if project.is_empty() || project.contains(['/', '\\']) || project.starts_with('.') {
        bail!("--tracker-project-name {project:?}: a folder name (no path separators, not empty, not hidden)");
    }
    file.train.validate_settings().map_err(|e| name_setting(e, &flags_given(a), a.config.as_deref()))
}

/// Runs `lisa train`.
pub fn run<B: RankBackend>(a: TrainArgs, device: B::Device) -> Result<()> {
    let plan = Plan::new(a.gpus)?;
    if a.collective_timeout == 0 {
        bail!("--collective-timeout must be at least 1 (seconds)");
    }
    let mut file = RunFile::load(a.config.as_deref())?;
    apply(&a, &mut file);
    check_settings(&a, &file)?;
    let columns = crate::converted_dataset::Columns {
        image: a.image_column.clone(),
        conditioning: a.conditioning_image_column.clone(),
        caption: a.caption_column.clone(),
        skip_bad_rows: a.skip_bad_rows,
    };
    let cache = a.cache_dir.clone().unwrap_or_else(|| a.output_dir.join("cache"));
    let shards = a.train_shards.as_deref();
    let data = TrainData::new(file.data.dir.clone(), a.dataset_name.as_deref(), shards, columns, cache)?;
    let mut latent_validation = None;
    // The input cache's lock, held (shared) for the whole run: no other run rewrites it.
    let mut _cache_lock = None;
    let start = match (&a.main, &a.pretrained_model_name_or_path) {
        (Some(main), _) => {
            file.resolve_model(main)?;
            file.data.dir = data.folder()?;
            Start::Files { main, side: None }
        }
        (None, Some(dir)) => {
            if !data.is_given() {
                bail!("--pretrained-model-name-or-path needs --train-data-dir (or --dataset-name, --train-shards)");
            }
            let sd = if FluxPipeline::is_flux(dir) {
                a.refuse_sd_only_flags()?;
                crate::flux_train::prepare::<B>(&a.flux()?, &mut file, dir, &data, device.clone())?
            } else if Sd3Pipeline::is_sd3(dir) {
                a.refuse_sd_only_flags()?;
                a.refuse_flux_only_flags()?;
                crate::sd3_train::prepare::<B>(&a.sd3(), &mut file, dir, &data, device.clone())?
            } else {
                a.refuse_flux_only_flags()?;
                prepare_sd::<B>(&a, &mut file, dir, &data, device.clone())?
            };
            latent_validation = sd.validation;
            _cache_lock = sd.cache_lock;
            Start::Built(sd.model)
        }
        (None, None) => bail!("give --main (a lisa prior) or --pretrained-model-name-or-path (a diffusers folder)"),
    };
    let tensorboard =
        (a.report_to == ReportTo::Tensorboard).then(|| a.output_dir.join(&a.logging_dir).join(&a.tracker_project_name));
    let options = LoopOptions {
        tensorboard,
        validation_samples: a.num_validation_images,
        control_metric: a.control_metric,
        output_dir: &a.output_dir,
        validation_steps: a.validation_steps,
        validate_at_start: false,
        latent_validation,
        checkpoints: a.checkpoints.clone(),
        label: if file.train.mode == Mode::Lisa { "lisa" } else { "baseline" },
    };
    let latent = a.pretrained_model_name_or_path.is_some();
    let timeout = std::time::Duration::from_secs(a.collective_timeout);
    let report = train_ranks::<B>(&file, start, device, &options, &plan, timeout)?;
    if let Plan::Process(l) = &plan
        && l.rank != 0
    {
        eprintln!(
            "rank {} of {} done in {:.1} min; rank 0 wrote the outputs",
            l.rank,
            l.world_size,
            report.wall_seconds / 60.0
        );
        return Ok(());
    }
    // The toy's validation scores the circles' IoU; an SD run's validation writes grids.
    let validated = match (latent, report.final_score()) {
        (false, Some(v)) => format!("final iou {v:.4}"),
        (false, None) => "no validation".to_string(),
        (true, _) if options_validated(&a) => "validation grids written".to_string(),
        (true, _) => "no validation images (no --validation-image)".to_string(),
    };
    eprintln!(
        "done in {:.1} min (training {:.1} min); {validated}; outputs in {}",
        report.wall_seconds / 60.0,
        report.train_seconds / 60.0,
        a.output_dir.display()
    );
    Ok(())
}

fn options_validated(a: &TrainArgs) -> bool {
    !a.validation_image.is_empty()
}

impl TrainArgs {
    /// Refuses the flags of the UNet (SD, SDXL) path given for an SD3 folder.
    fn refuse_sd_only_flags(&self) -> Result<()> {
        let given = [
            ("--pretrained-vae-model-name-or-path", self.pretrained_vae_model_name_or_path.is_some()),
            ("--crops-coords-top-left-h", self.crops_coords_top_left_h != 0),
            ("--crops-coords-top-left-w", self.crops_coords_top_left_w != 0),
        ];
        if let Some((flag, _)) = given.iter().find(|g| g.1) {
            bail!("{flag} is for Stable Diffusion and SDXL UNet pipelines; this is an SD3 folder");
        }
        Ok(())
    }

    /// Refuses the flags of the Flux path given for another family's folder.
    fn refuse_flux_only_flags(&self) -> Result<()> {
        let given = [
            ("--num-double-layers", self.num_double_layers.is_some()),
            ("--num-single-layers", self.num_single_layers.is_some()),
            ("--guidance-scale", self.guidance_scale.is_some()),
            ("--control-mode", self.control_mode.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|g| g.1) {
            bail!("{flag} is for Flux pipelines; this folder is not one");
        }
        Ok(())
    }

    /// The flags the Flux path reads.
    fn flux(&self) -> Result<crate::flux_train::FluxArgs> {
        if self.controlnet_num_layers.is_some() || self.num_extra_conditioning_channels != 0 {
            bail!(
                "--controlnet-num-layers and --num-extra-conditioning-channels are SD3's; a Flux ControlNet made from the transformer takes --num-double-layers and --num-single-layers"
            );
        }
        Ok(crate::flux_train::FluxArgs {
            controlnet: self.controlnet_model_name_or_path.clone(),
            resolution: self.resolution,
            cache_dir: self.cache_dir.clone().unwrap_or_else(|| self.output_dir.join("cache")),
            validation_image: self.validation_image.clone(),
            validation_prompt: self.validation_prompt.clone(),
            mixed_precision: self.mixed_precision,
            weighting: crate::sd3_train::flow_weighting(
                self.weighting_scheme.as_deref(),
                (self.logit_mean, self.logit_std),
                self.mode_scale,
            )?,
            max_sequence_length: self.max_sequence_length,
            layers: (self.num_double_layers, self.num_single_layers),
            guidance_scale: self.guidance_scale,
            control_mode: self.control_mode,
        })
    }

    /// The flags the SD3 path reads.
    fn sd3(&self) -> crate::sd3_train::Sd3Args {
        crate::sd3_train::Sd3Args {
            controlnet: self.controlnet_model_name_or_path.clone(),
            resolution: self.resolution,
            cache_dir: self.cache_dir.clone().unwrap_or_else(|| self.output_dir.join("cache")),
            validation_image: self.validation_image.clone(),
            validation_prompt: self.validation_prompt.clone(),
            mixed_precision: self.mixed_precision,
            weighting_scheme: self.weighting_scheme.clone(),
            logit: (self.logit_mean, self.logit_std),
            mode_scale: self.mode_scale,
            precondition_outputs: self.precondition_outputs == 1,
            max_sequence_length: self.max_sequence_length.unwrap_or(77),
            extra_channels: self.num_extra_conditioning_channels,
            layers: self.controlnet_num_layers,
        }
    }
}

/// The SD path up to the first step, in the order that spends nothing before every check:
/// the pipeline's configs, the resolution, the ControlNet against the UNet, the hook and the
/// text encoder's width; the memory the sizes need; the UNet's and ControlNet's weights and
/// the validation images; only then the VAE and the text encoder encode the data (or the
/// cache is reused), and the model reads the embeddings.
fn prepare_sd<B: Backend>(
    a: &TrainArgs,
    file: &mut RunFile,
    dir: &Path,
    data: &TrainData,
    device: B::Device,
) -> Result<SdStart<B>> {
    if file.model_given {
        bail!("the run file describes a [model]; with --pretrained-model-name-or-path the model comes from the folder");
    }
    let in_folder = || format!("the diffusers folder {}", dir.display());
    let mut pipeline = Pipeline::open(dir)?;
    if let Some(vae) = &a.pretrained_vae_model_name_or_path {
        pipeline = pipeline.with_vae(vae).context("--pretrained-vae-model-name-or-path")?;
    }
    let resolution_flag = |e: lisa_trainer::TrainError| match e {
        lisa_trainer::TrainError::Setting { key, reason } if key == "resolution" => match a.resolution {
            Some(_) => anyhow::anyhow!("--resolution: {reason}"),
            None => anyhow::anyhow!("the UNet's sample_size as the resolution: {reason}; give --resolution"),
        },
        lisa_trainer::TrainError::Setting { key, reason } if key == "crops_coords_top_left" => {
            anyhow::anyhow!("--crops-coords-top-left-h/-w: {reason}")
        }
        other => anyhow::Error::from(other).context(in_folder()),
    };
    let size = pipeline.training_size(a.resolution).map_err(resolution_flag)?;
    let controlnet = a.controlnet_model_name_or_path.as_deref();
    if let Some(c) = controlnet
        && !c.is_dir()
    {
        bail!("--controlnet-model-name-or-path {}: no such folder", c.display());
    }
    pipeline.check_text_encoder().with_context(in_folder)?;
    let precision = a.mixed_precision;
    if precision != MixedPrecision::No {
        eprintln!("{}", mixed_precision_note::<B>(precision, &device));
    }
    let crop = [a.crops_coords_top_left_h, a.crops_coords_top_left_w];
    file.model =
        pipeline.controlnet_spec(controlnet, (size, crop), precision, &file.model.decoder).map_err(resolution_flag)?;
    file.train.noise = pipeline.noise;
    file.validation.sampling.zero_null_prompt |= pipeline.force_zeros_for_empty_prompt().with_context(in_folder)?;
    let needed =
        SdSpec::from_spec(&file.model)?.training_bytes(file.train.batch_size, file.train.ema_decay.is_some())?;
    crate::config::check_training_bytes::<B>(needed, &device)?;
    let vae_dtype = pipeline.vae_dtype(precision).with_context(in_folder)?;
    if vae_dtype != precision.dtype() {
        eprintln!("the VAE computes in f32: its config says force_upcast (SDXL's VAE overflows in fp16)");
    }
    let (validation, prompts) =
        LatentValidationFiles::from_flags(&a.validation_image, &a.validation_prompt, &pipeline.vae, vae_dtype)?;
    // Everything cheap is checked: the dataset is converted (if it is one), then the model read.
    let data = data.required_folder(&mut file.data.dir)?;
    let parts = mode_parts(file.train.mode);
    let mut model =
        pipeline.build::<B>(&file.model, parts, controlnet, device.clone(), file.train.seed).with_context(in_folder)?;
    if let Some(v) = &validation {
        read_conditions::<B>(&model, v)?;
    }
    let cache_dir = a.cache_dir.clone().unwrap_or_else(|| a.output_dir.join("cache"));
    let cache = sd_cache::prepare::<B>(&pipeline, &data, &cache_dir, size.pixels, &prompts, precision, device)?;
    model.read_text_embeddings(&cache.embeddings, cache.pooled.as_deref())?;
    file.model = model.spec();
    file.data.latents = Some(cache.latents);
    Ok(SdStart { model: Box::new(model), validation, cache_lock: cache.lock })
}
