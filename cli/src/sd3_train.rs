//! `lisa train --pretrained-model-name-or-path` on an SD3 / SD3.5 pipeline folder: the sd3
//! model from the folder's transformer (and a ControlNet folder or `from_transformer`),
//! flow matching with the folder's scheduler and train_controlnet_sd3.py's weighting, and the
//! inputs it trains on: the target latents, the condition latents (the condition images
//! VAE-encoded, as train_controlnet_sd3.py does, from pixels in [0, 1]), and the prompts'
//! `prompt_embeds` and `pooled_prompt_embeds`. These are the data folder's own precomputed
//! files when it has all four, else computed once with the folder's VAE and three text
//! encoders into the input cache (reused while the data, the resolution and the encoders'
//! files are the same; the same lock and key as the SD path's cache). Validation samples with
//! Euler on diffusers' schedule, the condition images VAE-encoded as in training, and decodes
//! with the folder's VAE.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::data::Dataset;
use lisa_trainer::model::sd::{MixedPrecision, Vae};
use lisa_trainer::model::sd3::{Sd3Pipeline, Sd3Spec, Sd3TextEncoders, Sd3Training};
use lisa_trainer::scheduler::FlowWeighting;
use lisa_trainer::weights::digest;

use crate::config::RunFile;
use crate::fill50k::{CONDITION_LATENTS_FILE, Fill50k, LATENTS_FILE, Layout};
use crate::pipeline_start::{SdStart, mixed_precision_note, mode_parts};
use crate::sd_cache::{
    EMBEDDINGS_FILE, FileDigests, KEY, POOLED_EMBEDDINGS_FILE, check_outside, encoding_chunk, folder_digest,
    locked_cache, write_latents,
};
use crate::sd_validation::{LatentValidationFiles, read_rgb};
use crate::train_data::TrainData;

/// The flags the SD3 path reads.
#[derive(Debug, Clone)]
pub struct Sd3Args {
    /// A ControlNet folder to continue from.
    pub controlnet: Option<PathBuf>,
    /// `--resolution`.
    pub resolution: Option<usize>,
    /// Where computed inputs are cached.
    pub cache_dir: PathBuf,
    /// `--validation-image`.
    pub validation_image: Vec<PathBuf>,
    /// `--validation-prompt`.
    pub validation_prompt: Vec<String>,
    /// `--mixed-precision`.
    pub mixed_precision: MixedPrecision,
    /// `--weighting-scheme` (None: logit_normal).
    pub weighting_scheme: Option<String>,
    /// `--logit-mean`, `--logit-std`.
    pub logit: (f64, f64),
    /// `--mode-scale`.
    pub mode_scale: f64,
    /// `--precondition-outputs 1`.
    pub precondition_outputs: bool,
    /// `--max-sequence-length`.
    pub max_sequence_length: usize,
    /// `--num-extra-conditioning-channels`.
    pub extra_channels: usize,
    /// `--controlnet-num-layers`.
    pub layers: Option<usize>,
}

impl Sd3Args {
    /// train_controlnet_sd3.py's weighting and preconditioning from the flags.
    fn training(&self) -> Result<Sd3Training> {
        let weighting = flow_weighting(self.weighting_scheme.as_deref(), self.logit, self.mode_scale)?;
        Ok(Sd3Training { weighting, precondition_outputs: self.precondition_outputs })
    }
}

/// `--weighting-scheme` (logit_normal when None) with its parameters `(--logit-mean,
/// --logit-std)` and `--mode-scale`, as the flow trainers of diffusers read them.
pub(crate) fn flow_weighting(scheme: Option<&str>, (mean, std): (f64, f64), mode_scale: f64) -> Result<FlowWeighting> {
    Ok(match scheme.unwrap_or("logit_normal") {
        "logit_normal" => FlowWeighting::LogitNormal { mean, std },
        "mode" => FlowWeighting::Mode { scale: mode_scale },
        "sigma_sqrt" => FlowWeighting::SigmaSqrt,
        "cosmap" => FlowWeighting::Cosmap,
        "none" => FlowWeighting::None,
        other => bail!("--weighting-scheme {other:?}: logit_normal | mode | sigma_sqrt | cosmap | none"),
    })
}

/// The SD3 path up to the first step, every check before any weight or image is read.
pub fn prepare<B: Backend>(
    a: &Sd3Args,
    file: &mut RunFile,
    dir: &Path,
    data: &TrainData,
    device: B::Device,
) -> Result<SdStart<B>> {
    if file.model_given {
        bail!("the run file describes a [model]; with --pretrained-model-name-or-path the model comes from the folder");
    }
    let in_folder = || format!("the SD3 folder {}", dir.display());
    let pipeline = Sd3Pipeline::open(dir)?;
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
    if controlnet.is_some() && (a.layers.is_some() || a.extra_channels != 0) {
        bail!(
            "--controlnet-num-layers and --num-extra-conditioning-channels make a ControlNet from the transformer; --controlnet-model-name-or-path brings its own"
        );
    }
    let training = a.training()?;
    let precision = a.mixed_precision;
    if precision != MixedPrecision::No {
        eprintln!("{}", mixed_precision_note::<B>(precision, &device).replace("UNet", "transformer"));
    }
    let layers = (a.layers, a.extra_channels);
    file.model = pipeline.controlnet_spec(controlnet, layers, size, precision, &file.model.decoder)?;
    file.train.noise = pipeline.noise(training);
    lisa_trainer::scheduler::NoiseProcess::new(&file.train.noise)?;
    // The joint text: 77 CLIP tokens, then T5's.
    let text_tokens = a.max_sequence_length.saturating_add(77);
    let ema = file.train.ema_decay.is_some();
    let needed = Sd3Spec::from_spec(&file.model)?.training_bytes(file.train.batch_size, text_tokens, ema)?;
    crate::config::check_training_bytes::<B>(needed, &device)?;
    let (validation, prompts) = LatentValidationFiles::from_flags(
        &a.validation_image,
        &a.validation_prompt,
        &dir.join("vae"),
        precision.dtype(),
    )?;
    if let Some(v) = &validation {
        if !v.vae.is_dir() {
            bail!(
                "--validation-image: {} has no vae/ to encode the condition images and decode the samples",
                dir.display()
            );
        }
        read_rgb(v, size.pixels)?;
        // Flows sample with Euler.
        file.validation.sampling.sampler = lisa_trainer::scheduler::Sampler::Euler;
    }
    // Everything cheap is checked: the dataset is converted (if it is one), then the model read.
    let data = data.required_folder(&mut file.data.dir)?;
    let parts = mode_parts(file.train.mode);
    let mut model =
        pipeline.build::<B>(&file.model, parts, controlnet, device.clone(), file.train.seed).with_context(in_folder)?;
    let joint = model.transformer_config().joint_attention_dim;
    let inputs = inputs::<B>(&pipeline, a, &data, size.pixels, joint, &prompts, device)?;
    model.read_text_embeddings(&inputs.text, &inputs.pooled)?;
    // The validation prompts must be in the tables (the data folder's own ones included).
    lisa_trainer::model::DualDenoiser::embed_prompts(&model, &prompts.iter().map(String::as_str).collect::<Vec<_>>())
        .context("--validation-prompt")?;
    file.model = lisa_trainer::model::DualDenoiser::spec(&model);
    file.data.latents = Some(inputs.latents);
    file.data.condition_latents = Some(inputs.condition_latents);
    Ok(SdStart { model: Box::new(model), validation, cache_lock: inputs.lock })
}

/// Where a flow transformer run's inputs are (SD3's and Flux's alike).
pub(crate) struct Inputs {
    pub(crate) latents: PathBuf,
    pub(crate) condition_latents: PathBuf,
    pub(crate) text: PathBuf,
    pub(crate) pooled: PathBuf,
    pub(crate) lock: Option<std::fs::File>,
}

/// The data folder's four precomputed files, or the cache made now if missing or stale.
fn inputs<B: Backend>(
    pipeline: &Sd3Pipeline,
    a: &Sd3Args,
    data: &Path,
    resolution: usize,
    joint: usize,
    extra_prompts: &[String],
    device: B::Device,
) -> Result<Inputs> {
    let needed = ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"];
    let digested =
        ["vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"];
    let head = |set: &Fill50k| {
        format!(
            "sd3 data {} resolution {resolution} precision {:?} max_sequence_length {} width {joint} extra {extra_prompts:?}",
            set.fingerprint(),
            a.mixed_precision,
            a.max_sequence_length
        )
    };
    flow_inputs(&pipeline.root, (data, &a.cache_dir), resolution, (&needed, &digested), head, |set, cached, key| {
        write_cache::<B>(pipeline, a, (set, extra_prompts), resolution, joint, cached, key, device)
    })
}

/// A flow transformer run's four inputs (latents, condition latents, text tokens, pooled text):
/// the data folder's own precomputed files when it has all four, else the cache in
/// `cache_dir`, written by `write` (the data set, the four paths, the key) when missing or
/// stale. The pipeline folder `root` must hold the parts `needed` to encode; the cache key is
/// `head` (of the data set) with the digests of the parts `digested`.
pub(crate) fn flow_inputs(
    root: &Path,
    (data, cache_dir): (&Path, &Path),
    resolution: usize,
    (needed, digested): (&[&str], &[&str]),
    head: impl FnOnce(&Fill50k) -> String,
    write: impl FnOnce(&Fill50k, &[PathBuf], &str) -> Result<()>,
) -> Result<Inputs> {
    let names = [LATENTS_FILE, CONDITION_LATENTS_FILE, EMBEDDINGS_FILE, POOLED_EMBEDDINGS_FILE];
    let in_data: Vec<PathBuf> = names.iter().map(|n| data.join(n)).collect();
    if in_data.iter().all(|p| p.is_file()) {
        eprintln!("using the precomputed {} of {}", names.join(", "), data.display());
        let [latents, condition_latents, text, pooled] = in_data.try_into().expect("four files");
        return Ok(Inputs { latents, condition_latents, text, pooled, lock: None });
    }
    check_outside(cache_dir, data)?;
    let missing: Vec<&str> = needed.iter().copied().filter(|c| !root.join(c).is_dir()).collect();
    if !missing.is_empty() {
        bail!(
            "{} has no {}: lisa needs them to compute the latents and text embeddings (or put precomputed {} in {})",
            root.display(),
            missing.join("/, ") + "/",
            names.join(", "),
            data.display()
        );
    }
    let set = Fill50k::open(
        data,
        Layout {
            image: [3, resolution, resolution],
            hint: [3, resolution, resolution],
            latents: None,
            hint_latents: None,
        },
    )?;
    let mut digests = FileDigests::open(cache_dir)?;
    let mut parts = vec![head(&set)];
    for part in digested {
        parts.push(format!("{part} {}", folder_digest(&root.join(part), &mut digests)?));
    }
    let key = digest(parts.join(" ").as_bytes());
    let cached: Vec<PathBuf> = names.iter().map(|n| cache_dir.join(n)).collect();
    let refs: Vec<&Path> = cached.iter().map(PathBuf::as_path).collect();
    let lock =
        locked_cache(cache_dir, &key, (&refs, "latents and text embeddings"), digests, || write(&set, &cached, &key))?;
    let [latents, condition_latents, text, pooled] = cached.try_into().expect("four files");
    Ok(Inputs { latents, condition_latents, text, pooled, lock: Some(lock) })
}

/// Encodes the prompts and the images and writes the four files (under the exclusive lock).
#[allow(clippy::too_many_arguments)]
fn write_cache<B: Backend>(
    pipeline: &Sd3Pipeline,
    a: &Sd3Args,
    inputs: (&Fill50k, &[String]),
    resolution: usize,
    joint: usize,
    files: &[PathBuf],
    key: &str,
    device: B::Device,
) -> Result<()> {
    let root = &pipeline.root;
    let dtype = a.mixed_precision.dtype();
    // The condition images go to the VAE in [0, 1], as train_controlnet_sd3.py passes them.
    let encoding = (resolution, dtype, false);
    write_flow_cache::<B>(root, inputs, encoding, (files, key, &a.cache_dir), device.clone(), |prompts, meta| {
        let text = Sd3TextEncoders::<B>::open(root, device, dtype, a.max_sequence_length, joint)
            .with_context(|| format!("loading the text encoders of {}", root.display()))?;
        Ok(text.write_tables(prompts, (&files[2], &files[3]), meta)?)
    })
}

/// Writes a flow transformer run's four input files under the cache's exclusive lock
/// (`files`: latents, condition latents, text tokens, pooled text; `key` in their metadata):
/// the prompt tables through `write_text` (every distinct prompt, the null prompt and
/// `extra_prompts`, encoded once; the text encoders are dropped before the VAE is read), then
/// the target latents (images in [−1, 1]) and the condition latents (images in [−1, 1] with
/// `signed_hints`, else [0, 1]) through the folder's VAE in `dtype`, each image resized and
/// centre-cropped to `resolution`. SD3's and Flux's caches alike.
pub(crate) fn write_flow_cache<B: Backend>(
    root: &Path,
    (set, extra_prompts): (&Fill50k, &[String]),
    (resolution, dtype, signed_hints): (usize, lisa_core::backend::DType, bool),
    (files, key, cache_dir): (&[PathBuf], &str, &Path),
    device: B::Device,
    write_text: impl FnOnce(&[&str], &BTreeMap<String, String>) -> Result<()>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let meta = BTreeMap::from([(KEY.to_string(), key.to_string()), ("resolution".to_string(), resolution.to_string())]);
    let mut prompts: BTreeSet<&str> = set.prompts().collect();
    prompts.insert("");
    prompts.extend(extra_prompts.iter().map(String::as_str));
    let prompts: Vec<&str> = prompts.into_iter().collect();
    write_text(&prompts, &meta)?;
    let vae = Vae::<B>::open(&root.join("vae"), device, dtype)
        .with_context(|| format!("loading the VAE of {}", root.display()))?;
    let chunk = encoding_chunk(Some(vae.config()), resolution)?;
    let owned = |it: &mut dyn Iterator<Item = (&str, &Path, usize)>| -> Vec<(String, PathBuf, usize)> {
        it.map(|(n, p, l)| (n.to_string(), p.to_path_buf(), l)).collect()
    };
    let sizes = (resolution, chunk);
    let (targets, [lc, side, _]) = write_latents(&vae, &owned(&mut set.targets()), sizes, true, &files[0], &meta)?;
    let (sources, _) = write_latents(&vae, &owned(&mut set.sources()), sizes, signed_hints, &files[1], &meta)?;
    eprintln!(
        "cached {targets} latents and {sources} condition latents ({lc}×{side}×{side}) and {} prompts' embeddings in {} ({:.1} s)",
        prompts.len(),
        cache_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
