//! A diffusers SD3 / SD3.5 pipeline folder (`transformer/`, `scheduler/`, and for encoding
//! the data `vae/`, `text_encoder*/`, `tokenizer*/`): what training reads of it, and the
//! model built from it. As for SD 1.x/2.x, everything the configs can tell is checked by
//! [`Sd3Pipeline::controlnet_spec`] before any weight is allocated or any image encoded.

use std::path::{Path, PathBuf};

use lisa_core::backend::Backend;
use serde_json::{Map, Value};

use super::{Sd3Config, Sd3Model, Sd3Spec};
use crate::error::{Result, TrainError};
use crate::model::sd::{
    MixedPrecision, SD_VAE_DOWNSCALE, TrainingSize, VaeConfig, config_error_in, folder_vae_config, read_json_config,
};
use crate::model::{DecoderConfig, DualDenoiser, ModelSpec, Parts};
use crate::scheduler::{FlowWeighting, NoiseConfig};
use crate::weights::bad;

/// The training settings of train_controlnet_sd3.py that are not in the folder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sd3Training {
    /// `--weighting_scheme` with its parameters (logit_normal(0, 1) by default).
    pub weighting: FlowWeighting,
    /// `--precondition_outputs` (on by default).
    pub precondition_outputs: bool,
}

impl Default for Sd3Training {
    fn default() -> Self {
        Self { weighting: FlowWeighting::LogitNormal { mean: 0.0, std: 1.0 }, precondition_outputs: true }
    }
}

/// The parts of an SD3 pipeline folder training uses.
#[derive(Debug, Clone)]
pub struct Sd3Pipeline {
    /// The folder.
    pub root: PathBuf,
    /// `transformer/config.json`.
    pub transformer: Map<String, Value>,
    /// `FlowMatchEulerDiscreteScheduler`'s `shift`.
    pub shift: f64,
    /// Its `num_train_timesteps`.
    pub num_train_timesteps: usize,
}

/// Scheduler keys accepted only at these values (others change the training times).
const SCHEDULER_AT_DEFAULT: &[(&str, Value)] = &[
    ("use_dynamic_shifting", Value::Bool(false)),
    ("invert_sigmas", Value::Bool(false)),
    ("use_karras_sigmas", Value::Bool(false)),
    ("use_exponential_sigmas", Value::Bool(false)),
    ("use_beta_sigmas", Value::Bool(false)),
    ("stochastic_sampling", Value::Bool(false)),
    ("shift_terminal", Value::Null),
];

/// The `_class_name` of the JSON file at `path` (None: no such file, or none named).
pub(crate) fn class_name(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("_class_name").and_then(Value::as_str).map(str::to_string))
}

/// What [`read_flow_folder`] reads: the transformer's config, the scheduler config's path and
/// the scheduler config.
pub(crate) type FlowFolder = (Map<String, Value>, PathBuf, Map<String, Value>);

/// A flow transformer's pipeline folder `root` (`folder`, e.g. "an SD3 pipeline folder", and
/// `family` name it in errors): its
/// `transformer/config.json`, and its `scheduler/scheduler_config.json` (with its path), a
/// `FlowMatchEulerDiscreteScheduler` whose keys `at_default` hold only those values (a
/// `false` may also be null). A missing part or another setting is an error naming it.
pub(crate) fn read_flow_folder(
    root: &Path,
    (folder, family): (&str, &str),
    at_default: &[(&str, Value)],
) -> Result<FlowFolder> {
    for part in ["transformer", "scheduler"] {
        if !root.join(part).is_dir() {
            return Err(bad(root, format!("is not {folder}: it has no {part}/")));
        }
    }
    let transformer = read_json_config(&root.join("transformer"))?;
    let path = root.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&path).map_err(crate::weights::io(&path))?;
    let Ok(Value::Object(c)) = serde_json::from_str::<Value>(&text) else {
        return Err(bad(&path, "is not a JSON object"));
    };
    match c.get("_class_name").and_then(Value::as_str) {
        Some("FlowMatchEulerDiscreteScheduler") | None => {}
        Some(other) => {
            return Err(bad(&path, format!("is a {other}; {family} trains with FlowMatchEulerDiscreteScheduler")));
        }
    }
    for (key, want) in at_default {
        if let Some(v) = c.get(*key)
            && v != want
            && !(v.is_null() && *want == Value::Bool(false))
        {
            return Err(bad(&path, format!("{key} = {v} is not supported (only {want})")));
        }
    }
    Ok((transformer, path, c))
}

impl Sd3Pipeline {
    /// Whether `root` holds an SD3 pipeline (`model_index.json` names a StableDiffusion3
    /// pipeline, or the folder has `transformer/`, not Flux's, and no `unet/`).
    pub fn is_sd3(root: &Path) -> bool {
        let named = class_name(&root.join("model_index.json")).map(|s| s.starts_with("StableDiffusion3"));
        named.unwrap_or_else(|| {
            root.join("transformer").is_dir()
                && !root.join("unet").is_dir()
                && class_name(&root.join("transformer/config.json")).is_none_or(|c| c != "FluxTransformer2DModel")
        })
    }

    /// Reads `transformer/config.json` and `scheduler/scheduler_config.json`; a missing part
    /// or an unsupported scheduler setting is an error naming it.
    pub fn open(root: &Path) -> Result<Self> {
        let (transformer, path, c) = read_flow_folder(root, ("an SD3 pipeline folder", "SD3"), SCHEDULER_AT_DEFAULT)?;
        let shift = match c.get("shift") {
            None | Some(Value::Null) => 1.0,
            Some(v) => v
                .as_f64()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| bad(&path, format!("shift = {v} must be > 0")))?,
        };
        let num_train_timesteps = match c.get("num_train_timesteps") {
            None | Some(Value::Null) => 1000,
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or_else(|| bad(&path, format!("num_train_timesteps = {v} is not a count of steps")))?
                as usize,
        };
        Ok(Self { root: root.to_path_buf(), transformer, shift, num_train_timesteps })
    }

    /// The transformer's folder.
    pub fn transformer_dir(&self) -> PathBuf {
        self.root.join("transformer")
    }

    /// The transformer's parsed config; errors name its file.
    pub fn transformer_config(&self) -> Result<Sd3Config> {
        Sd3Config::from_transformer_json(&self.transformer)
            .map_err(|e| config_error_in(&self.root.join("transformer/config.json"), e))
    }

    /// The VAE's config (None: the folder has no `vae/`).
    pub fn vae_config(&self) -> Result<Option<VaeConfig>> {
        folder_vae_config(&self.root)
    }

    /// The training noise: the scheduler's shift and grid of times, with `training`'s
    /// weighting and preconditioning.
    pub fn noise(&self, training: Sd3Training) -> NoiseConfig {
        NoiseConfig::Flow {
            shift: Some(self.shift),
            weighting: training.weighting,
            num_train_timesteps: Some(self.num_train_timesteps),
            precondition_outputs: training.precondition_outputs,
            sampling_shift: None,
        }
    }

    /// The training size: `resolution` pixels, or the transformer's `sample_size` times the
    /// VAE's downscale (8 without a `vae/`).
    pub fn training_size(&self, resolution: Option<usize>) -> Result<TrainingSize> {
        let vae = self.vae_config()?;
        let downscale = vae.as_ref().map_or(SD_VAE_DOWNSCALE, |c| c.downscale());
        let size = TrainingSize::resolve(resolution, || Ok(self.transformer_config()?.sample_size), downscale)?;
        if let Some(v) = vae {
            let c = self.transformer_config()?;
            if v.latent_channels != c.in_channels {
                return Err(bad(
                    &self.root.join("vae/config.json"),
                    format!("makes {} latent channels; the transformer reads {}", v.latent_channels, c.in_channels),
                ));
            }
        }
        Ok(size)
    }

    /// The sd3 model that trains a ControlNet for this pipeline's transformer at `size`: the
    /// ControlNet's config from the folder `controlnet`, or diffusers' `from_transformer` with
    /// `layers` blocks (None: 12) and `extra_channels` condition channels. Checked whole
    /// before anything is allocated; the text embeddings come later.
    pub fn controlnet_spec(
        &self,
        controlnet: Option<&Path>,
        (layers, extra_channels): (Option<usize>, usize),
        size: TrainingSize,
        precision: MixedPrecision,
        decoder: &DecoderConfig,
    ) -> Result<ModelSpec> {
        self.transformer_config()?;
        let controlnet = controlnet.map(read_json_config).transpose()?;
        let spec = Sd3Spec {
            transformer: self.transformer.clone(),
            controlnet,
            controlnet_layers: layers,
            extra_conditioning_channels: extra_channels,
            conditioning_scale: 1.0,
            text_embeddings: None,
            text_embeddings_sha256: None,
            pooled_text_embeddings: None,
            pooled_text_embeddings_sha256: None,
            latent_size: size.chosen.then_some(size.latent_side),
            mixed_precision: precision,
        };
        spec.validate(decoder).map_err(|e| match e {
            TrainError::Config(m) if m.starts_with("a latent side") => {
                TrainError::setting("resolution", format!("{} px: {m}", size.pixels))
            }
            other => other,
        })?;
        Ok(spec.to_spec(decoder))
    }

    /// Builds `spec` on `device`, loads the transformer's weights, then the ControlNet's from
    /// `controlnet` (None: made from the transformer).
    pub fn build<B: Backend>(
        &self,
        spec: &ModelSpec,
        parts: Parts,
        controlnet: Option<&Path>,
        device: B::Device,
        seed: u64,
    ) -> Result<Sd3Model<B>> {
        let mut model = Sd3Model::<B>::new(spec, parts, device, seed)?;
        model.load_main(&self.transformer_dir())?;
        if let Some(dir) = controlnet {
            model.load_side(dir)?;
        }
        Ok(model)
    }
}
