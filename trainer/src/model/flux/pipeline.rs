//! A diffusers Flux pipeline folder (`transformer/`, `scheduler/`, and for encoding the data
//! `vae/`, `text_encoder/` (CLIP), `text_encoder_2/` (T5) with their tokenizers): what
//! training reads of it, and the model built from it. As for the other families, everything
//! the configs can tell is checked by [`FluxPipeline::controlnet_spec`] before any weight is
//! allocated or any image encoded.
//!
//! Flux's scheduler shifts its times by the image size at sampling (`use_dynamic_shifting`):
//! training draws them from the unshifted grid (as `FlowMatchEulerDiscreteScheduler` builds it
//! then, and train_controlnet_flux.py uses it); sampling shifts by
//! `μ = base_shift + (max_shift − base_shift)·(n − base_seq)/(max_seq − base_seq)` for `n`
//! image tokens ([`FluxPipeline::sampling_mu`]).

use std::path::{Path, PathBuf};

use lisa_core::backend::Backend;
use serde_json::{Map, Value};

use super::{FluxConfig, FluxModel, FluxSpec};
use crate::error::{Result, TrainError};
use crate::model::sd::{
    MixedPrecision, SD_VAE_DOWNSCALE, TrainingSize, VaeConfig, config_error_in, folder_vae_config, read_json_config,
};
use crate::model::sd3::{class_name, read_flow_folder};
use crate::model::{DecoderConfig, DualDenoiser, ModelSpec, Parts};
use crate::scheduler::{FlowWeighting, NoiseConfig};
use crate::weights::bad;

/// train_controlnet_flux.py's default `--resolution`.
pub const DEFAULT_RESOLUTION: usize = 512;

/// The parts of a Flux pipeline folder training uses.
#[derive(Debug, Clone)]
pub struct FluxPipeline {
    /// The folder.
    pub root: PathBuf,
    /// `transformer/config.json`.
    pub transformer: Map<String, Value>,
    /// The scheduler's `shift` (applied to training times only without dynamic shifting).
    pub shift: f64,
    /// `use_dynamic_shifting`: the times are shifted by the image size at sampling.
    pub dynamic_shifting: bool,
    /// `(base_shift, max_shift)`: μ at `base_image_seq_len` and `max_image_seq_len` tokens.
    pub shift_range: (f64, f64),
    /// `(base_image_seq_len, max_image_seq_len)`.
    pub seq_range: (f64, f64),
    /// `num_train_timesteps`.
    pub num_train_timesteps: usize,
}

/// Scheduler keys accepted only at these values (others change the times).
const SCHEDULER_AT_DEFAULT: &[(&str, Value)] = &[
    ("invert_sigmas", Value::Bool(false)),
    ("use_karras_sigmas", Value::Bool(false)),
    ("use_exponential_sigmas", Value::Bool(false)),
    ("use_beta_sigmas", Value::Bool(false)),
    ("stochastic_sampling", Value::Bool(false)),
    ("shift_terminal", Value::Null),
];

impl FluxPipeline {
    /// Whether `root` holds a Flux pipeline (`model_index.json` names a Flux pipeline, or
    /// `transformer/config.json` a `FluxTransformer2DModel`).
    pub fn is_flux(root: &Path) -> bool {
        class_name(&root.join("model_index.json")).is_some_and(|c| c.starts_with("Flux"))
            || class_name(&root.join("transformer/config.json")).is_some_and(|c| c == "FluxTransformer2DModel")
    }

    /// Reads `transformer/config.json` and `scheduler/scheduler_config.json`; a missing part
    /// or an unsupported scheduler setting is an error naming it.
    pub fn open(root: &Path) -> Result<Self> {
        let (transformer, path, c) = read_flow_folder(root, ("a Flux pipeline folder", "Flux"), SCHEDULER_AT_DEFAULT)?;
        if let Some(v) = c.get("time_shift_type")
            && !(v.is_null() || v == "exponential")
        {
            return Err(bad(&path, format!("time_shift_type = {v} is not supported (only \"exponential\")")));
        }
        let positive = |key: &str, default: f64| -> Result<f64> {
            match c.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| bad(&path, format!("{key} = {v} must be a positive number"))),
            }
        };
        let num_train_timesteps = positive("num_train_timesteps", 1000.0)?;
        if num_train_timesteps.fract() != 0.0 || num_train_timesteps > 1e6 {
            return Err(bad(&path, format!("num_train_timesteps = {num_train_timesteps} is not a count of steps")));
        }
        let seq_range = (positive("base_image_seq_len", 256.0)?, positive("max_image_seq_len", 4096.0)?);
        if seq_range.1 <= seq_range.0 {
            return Err(bad(&path, "max_image_seq_len must exceed base_image_seq_len"));
        }
        Ok(Self {
            root: root.to_path_buf(),
            transformer,
            shift: positive("shift", 1.0)?,
            dynamic_shifting: c.get("use_dynamic_shifting").and_then(Value::as_bool).unwrap_or(false),
            shift_range: (positive("base_shift", 0.5)?, positive("max_shift", 1.15)?),
            seq_range,
            num_train_timesteps: num_train_timesteps as usize,
        })
    }

    /// The transformer's folder.
    pub fn transformer_dir(&self) -> PathBuf {
        self.root.join("transformer")
    }

    /// The transformer's parsed config; errors name its file.
    pub fn transformer_config(&self) -> Result<FluxConfig> {
        FluxConfig::from_transformer_json(&self.transformer)
            .map_err(|e| config_error_in(&self.root.join("transformer/config.json"), e))
    }

    /// The VAE's config (None: the folder has no `vae/`).
    pub fn vae_config(&self) -> Result<Option<VaeConfig>> {
        folder_vae_config(&self.root)
    }

    /// The training noise: diffusers' grid of times, shifted by the scheduler's `shift` unless
    /// it shifts dynamically, drawn by `weighting`; the plain velocity loss (no
    /// preconditioning), as train_controlnet_flux.py trains. Sampling at `size` shifts by
    /// `e^μ` of its token count when the scheduler shifts dynamically, from σ = 1 … 1/n, as
    /// `FluxPipeline` samples.
    pub fn noise(&self, weighting: FlowWeighting, size: TrainingSize) -> NoiseConfig {
        let tokens = (size.latent_side / 2).pow(2);
        NoiseConfig::Flow {
            shift: Some(if self.dynamic_shifting { 1.0 } else { self.shift }),
            weighting,
            num_train_timesteps: Some(self.num_train_timesteps),
            precondition_outputs: false,
            sampling_shift: Some(self.sampling_mu(tokens).map_or(self.shift, f64::exp)),
        }
    }

    /// The dynamic shift's `μ` for `tokens` image tokens (diffusers' `calculate_shift`; the
    /// sampler's times become `e^μ / (e^μ + 1/σ − 1)`); None without dynamic shifting.
    pub fn sampling_mu(&self, tokens: usize) -> Option<f64> {
        let ((base_shift, max_shift), (base_seq, max_seq)) = (self.shift_range, self.seq_range);
        let m = (max_shift - base_shift) / (max_seq - base_seq);
        self.dynamic_shifting.then_some(tokens as f64 * m + base_shift - m * base_seq)
    }

    /// The training size: `resolution` pixels (train_controlnet_flux.py's 512 by default), a
    /// multiple of twice the VAE's downscale (Flux packs 2×2 latent patches); the VAE's latent
    /// channels must be a quarter of the transformer's `in_channels`.
    pub fn training_size(&self, resolution: Option<usize>) -> Result<TrainingSize> {
        let vae = self.vae_config()?;
        let downscale = vae.as_ref().map_or(SD_VAE_DOWNSCALE, |c| c.downscale());
        let size = TrainingSize::resolve(Some(resolution.unwrap_or(DEFAULT_RESOLUTION)), || Ok(0), downscale)?;
        let size = TrainingSize { chosen: resolution.is_some(), ..size };
        if !size.latent_side.is_multiple_of(2) {
            return Err(TrainError::setting(
                "resolution",
                format!(
                    "{} px makes latents of {} a side; Flux packs 2×2 latent patches, so the resolution must be a multiple of {}",
                    size.pixels,
                    size.latent_side,
                    2 * downscale
                ),
            ));
        }
        let c = self.transformer_config()?;
        if let Some(v) = vae
            && 4 * v.latent_channels != c.in_channels
        {
            return Err(bad(
                &self.root.join("vae/config.json"),
                format!(
                    "makes {} latent channels; the transformer reads 2×2 patches of {} ({} in_channels)",
                    v.latent_channels,
                    c.in_channels / 4,
                    c.in_channels
                ),
            ));
        }
        Ok(size)
    }

    /// The flux model that trains a ControlNet for this pipeline's transformer at `size`: the
    /// ControlNet's config from the folder `controlnet`, or diffusers' `from_transformer` with
    /// `layers` double- and single-stream blocks (None: 4 and 4); `guidance_scale` for a
    /// guidance-distilled transformer (None: 3.5); `control_mode` for a union ControlNet.
    /// Checked whole before anything is allocated; the text embeddings come later.
    pub fn controlnet_spec(
        &self,
        controlnet: Option<&Path>,
        layers: (Option<usize>, Option<usize>),
        size: TrainingSize,
        (precision, guidance_scale, control_mode): (MixedPrecision, Option<f32>, Option<usize>),
        decoder: &DecoderConfig,
    ) -> Result<ModelSpec> {
        self.transformer_config()?;
        let controlnet = controlnet.map(read_json_config).transpose()?;
        let spec = FluxSpec {
            transformer: self.transformer.clone(),
            controlnet,
            controlnet_layers: layers.0,
            controlnet_single_layers: layers.1,
            control_mode,
            guidance_scale,
            conditioning_scale: 1.0,
            text_embeddings: None,
            text_embeddings_sha256: None,
            pooled_text_embeddings: None,
            pooled_text_embeddings_sha256: None,
            latent_size: Some(size.latent_side),
            mixed_precision: precision,
        };
        spec.validate(decoder)?;
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
    ) -> Result<FluxModel<B>> {
        let mut model = FluxModel::<B>::new(spec, parts, device, seed)?;
        model.load_main(&self.transformer_dir())?;
        if let Some(dir) = controlnet {
            model.load_side(dir)?;
        }
        Ok(model)
    }
}
