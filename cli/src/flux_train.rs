//! `lisa train --pretrained-model-name-or-path` on a Flux pipeline folder: the flux model from
//! the folder's transformer (and a ControlNet folder or `from_transformer`), flow matching on
//! the scheduler's unshifted grid with train_controlnet_flux.py's weighting and plain velocity
//! loss, and the inputs it trains on: the target latents and the condition latents (both
//! images VAE-encoded from pixels in [−1, 1], as train_controlnet_flux.py normalises them),
//! the prompts' T5 tokens and pooled CLIP text. These are the data folder's own precomputed
//! files when it has all four, else computed once into the input cache (the same lock and key
//! as the other families' caches). Validation samples with Euler on FluxPipeline's schedule
//! (σ from 1 to 1/n, shifted by `e^μ` of the image's token count), the condition images
//! VAE-encoded as in training, and decodes with the folder's VAE.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::data::Dataset;
use lisa_trainer::model::flux::{FluxModel, FluxPipeline, FluxSpec, FluxTextEncoders};
use lisa_trainer::model::sd::MixedPrecision;
use lisa_trainer::scheduler::FlowWeighting;

use crate::config::RunFile;
use crate::fill50k::Fill50k;
use crate::pipeline_start::{SdStart, mixed_precision_note, mode_parts};
use crate::sd_validation::{LatentValidationFiles, read_rgb};
use crate::sd3_train::{Inputs, flow_inputs, write_flow_cache};
use crate::train_data::TrainData;

/// The flags the Flux path reads.
#[derive(Debug, Clone)]
pub struct FluxArgs {
    /// A ControlNet folder to continue from.
    pub controlnet: Option<PathBuf>,
    /// `--resolution` (None: 512).
    pub resolution: Option<usize>,
    /// Where computed inputs are cached.
    pub cache_dir: PathBuf,
    /// `--validation-image`.
    pub validation_image: Vec<PathBuf>,
    /// `--validation-prompt`.
    pub validation_prompt: Vec<String>,
    /// `--mixed-precision`.
    pub mixed_precision: MixedPrecision,
    /// `--weighting-scheme` and its parameters.
    pub weighting: FlowWeighting,
    /// `--max-sequence-length` (T5 tokens; None: 512, diffusers' Flux pipeline's).
    pub max_sequence_length: Option<usize>,
    /// `--num-double-layers`, `--num-single-layers` of a ControlNet made from the transformer.
    pub layers: (Option<usize>, Option<usize>),
    /// `--guidance-scale` of a guidance-distilled transformer (None: 3.5).
    pub guidance_scale: Option<f32>,
    /// `--control-mode` of a union ControlNet.
    pub control_mode: Option<usize>,
}

/// T5 tokens per prompt when `--max-sequence-length` is not given (FluxPipeline's default).
const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// The Flux path up to the first step, every check before any weight or image is read.
pub fn prepare<B: Backend>(
    a: &FluxArgs,
    file: &mut RunFile,
    dir: &Path,
    data: &TrainData,
    device: B::Device,
) -> Result<SdStart<B>> {
    if file.model_given {
        bail!("the run file describes a [model]; with --pretrained-model-name-or-path the model comes from the folder");
    }
    let in_folder = || format!("the Flux folder {}", dir.display());
    let pipeline = FluxPipeline::open(dir)?;
    let size = pipeline.training_size(a.resolution).map_err(|e| match e {
        lisa_trainer::TrainError::Setting { key, reason } if key == "resolution" => {
            anyhow::anyhow!("--resolution: {reason}")
        }
        other => anyhow::Error::from(other).context(in_folder()),
    })?;
    let controlnet = a.controlnet.as_deref();
    if let Some(c) = controlnet
        && !c.is_dir()
    {
        bail!("--controlnet-model-name-or-path {}: no such folder", c.display());
    }
    if controlnet.is_some() && (a.layers.0.is_some() || a.layers.1.is_some()) {
        bail!(
            "--num-double-layers and --num-single-layers make a ControlNet from the transformer; --controlnet-model-name-or-path brings its own"
        );
    }
    let precision = a.mixed_precision;
    if precision != MixedPrecision::No {
        eprintln!("{}", mixed_precision_note::<B>(precision, &device).replace("UNet", "transformer"));
    }
    let settings = (precision, a.guidance_scale, a.control_mode);
    file.model =
        pipeline.controlnet_spec(controlnet, a.layers, size, settings, &file.model.decoder).with_context(in_folder)?;
    file.train.noise = pipeline.noise(a.weighting, size);
    lisa_trainer::scheduler::NoiseProcess::new(&file.train.noise)?;
    let text_tokens = a.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    let ema = file.train.ema_decay.is_some();
    let needed = FluxSpec::from_spec(&file.model)?.training_bytes(file.train.batch_size, text_tokens, ema)?;
    crate::config::check_training_bytes::<B>(needed, &device)?;
    let (mut validation, prompts) = LatentValidationFiles::from_flags(
        &a.validation_image,
        &a.validation_prompt,
        &dir.join("vae"),
        precision.dtype(),
    )?;
    if let Some(v) = &mut validation {
        if !v.vae.is_dir() {
            bail!(
                "--validation-image: {} has no vae/ to encode the condition images and decode the samples",
                dir.display()
            );
        }
        v.signed_hints = true;
        read_rgb(v, size.pixels)?;
        // Flows sample with Euler (on Flux's shifted schedule: the noise config's sampling shift).
        file.validation.sampling.sampler = lisa_trainer::scheduler::Sampler::Euler;
    }
    // Everything cheap is checked: the dataset is converted (if it is one), then the model read.
    let data = data.required_folder(&mut file.data.dir)?;
    let parts = mode_parts(file.train.mode);
    let mut model: FluxModel<B> =
        pipeline.build::<B>(&file.model, parts, controlnet, device.clone(), file.train.seed).with_context(in_folder)?;
    let inputs = inputs::<B>(&pipeline, a, &data, size.pixels, &prompts, device)?;
    model.read_text_embeddings(&inputs.text, &inputs.pooled)?;
    // The validation prompts must be in the tables (the data folder's own ones included).
    lisa_trainer::model::DualDenoiser::embed_prompts(&model, &prompts.iter().map(String::as_str).collect::<Vec<_>>())
        .context("--validation-prompt")?;
    file.model = lisa_trainer::model::DualDenoiser::spec(&model);
    file.data.latents = Some(inputs.latents);
    file.data.condition_latents = Some(inputs.condition_latents);
    Ok(SdStart { model: Box::new(model), validation, cache_lock: inputs.lock })
}

/// The data folder's four precomputed files, or the cache made now if missing or stale.
fn inputs<B: Backend>(
    pipeline: &FluxPipeline,
    a: &FluxArgs,
    data: &Path,
    resolution: usize,
    extra_prompts: &[String],
    device: B::Device,
) -> Result<Inputs> {
    let needed = ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"];
    let max_len = a.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH);
    let head = |set: &Fill50k| {
        format!(
            "flux data {} resolution {resolution} precision {:?} max_sequence_length {max_len} extra {extra_prompts:?}",
            set.fingerprint(),
            a.mixed_precision,
        )
    };
    flow_inputs(&pipeline.root, (data, &a.cache_dir), resolution, (&needed, &needed), head, |set, cached, key| {
        write_cache::<B>(pipeline, a, (set, extra_prompts, max_len), resolution, cached, key, device)
    })
}

/// Encodes the prompts and the images and writes the four files (under the exclusive lock).
fn write_cache<B: Backend>(
    pipeline: &FluxPipeline,
    a: &FluxArgs,
    (set, extra_prompts, max_len): (&Fill50k, &[String], usize),
    resolution: usize,
    files: &[PathBuf],
    key: &str,
    device: B::Device,
) -> Result<()> {
    let root = &pipeline.root;
    let dtype = a.mixed_precision.dtype();
    // Both images go to the VAE in [−1, 1].
    let encoding = (resolution, dtype, true);
    let cache = (files, key, a.cache_dir.as_path());
    write_flow_cache::<B>(root, (set, extra_prompts), encoding, cache, device.clone(), |prompts, meta| {
        let c = pipeline.transformer_config()?;
        let widths = (c.joint_attention_dim, c.pooled_projection_dim);
        let text = FluxTextEncoders::<B>::open(root, device, dtype, max_len, widths)
            .with_context(|| format!("loading the text encoders of {}", root.display()))?;
        Ok(text.write_tables(prompts, (&files[2], &files[3]), meta)?)
    })
}
