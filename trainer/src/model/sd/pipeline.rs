//! A diffusers Stable Diffusion pipeline folder (`model_index.json`, `unet/`, `scheduler/`,
//! `vae/`, `text_encoder/`, `tokenizer/`; SDXL adds `text_encoder_2/` and `tokenizer_2/`):
//! what training reads of it, and the model built from it. Everything that can be checked from the configs (sizes, the ControlNet against
//! the UNet, the hook, the text encoder's width, the training resolution) is checked by
//! [`Pipeline::controlnet_spec`] before any weight is allocated or any image encoded;
//! [`Pipeline::build`] then loads the weights in the one right order.

use std::path::{Path, PathBuf};

use lisa_core::Prediction;
use lisa_core::backend::{Backend, DType};
use lisa_core::schedule::BetaSchedule;
use serde_json::{Map, Value};

use super::config::TIME_IDS;
use super::encoders::read_text_pair;
use super::folder::read_json_config;
use super::sdxl_text::sdxl_text_widths;
use super::{ClipTextConfig, MixedPrecision, SD_VAE_DOWNSCALE, SdModel, SdSpec, UNetConfig, VaeConfig, latent_side};
use crate::error::{Result, TrainError};
use crate::model::{DecoderConfig, DualDenoiser, ModelSpec, Parts};
use crate::scheduler::NoiseConfig;
use crate::weights::bad;

/// The largest training resolution in pixels (SD trains at 512 to 1024).
pub const MAX_RESOLUTION: usize = 8192;

/// The size a pipeline trains at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingSize {
    /// Image side in pixels.
    pub pixels: usize,
    /// Latent side (`pixels` / the VAE's downscale).
    pub latent_side: usize,
    /// Whether it was asked for (else the UNet's `sample_size`).
    pub chosen: bool,
}

impl TrainingSize {
    /// `resolution` pixels, or the main network's `sample_size` (latents) times the VAE's
    /// `downscale`; at most [`MAX_RESOLUTION`], a multiple of `downscale` (errors under the
    /// `resolution` setting).
    pub fn resolve(
        resolution: Option<usize>,
        sample_size: impl FnOnce() -> Result<usize>,
        downscale: usize,
    ) -> Result<Self> {
        let pixels = match resolution {
            Some(r) => r,
            None => sample_size()?.saturating_mul(downscale),
        };
        if pixels > MAX_RESOLUTION {
            return Err(TrainError::setting(
                "resolution",
                format!("{pixels} px is more than lisa trains at (at most {MAX_RESOLUTION})"),
            ));
        }
        let side = latent_side(pixels, downscale).map_err(|e| TrainError::setting("resolution", e.to_string()))?;
        Ok(Self { pixels, latent_side: side, chosen: resolution.is_some() })
    }
}

/// The config of a pipeline folder's `vae/` (None: it has none); errors name its file.
pub fn folder_vae_config(root: &Path) -> Result<Option<VaeConfig>> {
    vae_config_in(&root.join("vae"))
}

/// The config of the VAE folder `dir` (None: no such folder); errors name its file.
fn vae_config_in(dir: &Path) -> Result<Option<VaeConfig>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let config = VaeConfig::from_json(&read_json_config(dir)?).map_err(|e| in_file(&dir.join("config.json"), e))?;
    Ok(Some(config))
}

/// The parts of a pipeline folder training uses.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The folder.
    pub root: PathBuf,
    /// `unet/config.json`.
    pub unet: Map<String, Value>,
    /// The training noise process of `scheduler/scheduler_config.json`.
    pub noise: NoiseConfig,
    /// Its `prediction_type`.
    pub prediction: Prediction,
    /// The VAE's folder: `vae/`, or the one given in its place
    /// ([`Pipeline::with_vae`], diffusers' `--pretrained_vae_model_name_or_path`).
    pub vae: PathBuf,
}

impl Pipeline {
    /// Reads `root/unet/config.json` and `root/scheduler/scheduler_config.json`; a missing
    /// component or an unsupported scheduler setting is an error naming it.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(bad(root, "no such diffusers pipeline folder"));
        }
        for part in ["unet", "scheduler"] {
            if !root.join(part).is_dir() {
                return Err(bad(root, format!("is not a diffusers pipeline folder: it has no {part}/")));
            }
        }
        let unet = read_json_config(&root.join("unet"))?;
        let path = root.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(crate::weights::io(&path))?;
        let scheduler: Map<String, Value> = match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => m,
            _ => return Err(bad(&path, "is not a JSON object")),
        };
        let (noise, prediction) = noise_of(&path, &scheduler)?;
        // The schedule itself (β range, step count) is checked here, against its file.
        crate::scheduler::NoiseProcess::new(&noise).map_err(|e| bad(&path, e.to_string()))?;
        Ok(Self { root: root.to_path_buf(), unet, noise, prediction, vae: root.join("vae") })
    }

    /// Uses the VAE in `dir` (a diffusers `AutoencoderKL` folder) in place of the pipeline's
    /// `vae/`, as SDXL users do with a VAE that does not overflow in fp16; its config is read
    /// now (errors name it).
    pub fn with_vae(mut self, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "no such VAE folder"));
        }
        vae_config_in(dir)?;
        self.vae = dir.to_path_buf();
        Ok(self)
    }

    /// Whether the UNet is SDXL's (`addition_embed_type = "text_time"`: two text encoders,
    /// pooled text and six time ids).
    pub fn is_sdxl(&self) -> Result<bool> {
        Ok(self.unet_config()?.text_time.is_some())
    }

    /// Whether the pipeline samples the empty negative prompt as zeros under classifier-free
    /// guidance: `force_zeros_for_empty_prompt` in `model_index.json`, which diffusers' SDXL
    /// pipelines default to true and SD 1.x/2.x ones do not have.
    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        let index = self.root.join("model_index.json");
        let given = std::fs::read_to_string(&index)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v.get("force_zeros_for_empty_prompt").and_then(Value::as_bool));
        Ok(given.unwrap_or(self.is_sdxl()?))
    }

    /// The dtype the VAE computes in under `precision`: `precision`'s, except f32 for an
    /// SDXL pipeline under fp16 whose VAE says `force_upcast` (SDXL's VAE overflows in fp16;
    /// diffusers' SDXL pipelines upcast it likewise).
    pub fn vae_dtype(&self, precision: MixedPrecision) -> Result<DType> {
        let upcast =
            precision == MixedPrecision::Fp16 && self.is_sdxl()? && self.vae_config()?.is_some_and(|c| c.force_upcast);
        Ok(if upcast { DType::F32 } else { precision.dtype() })
    }

    /// The UNet's folder.
    pub fn unet_dir(&self) -> PathBuf {
        self.root.join("unet")
    }

    /// The UNet's parsed config; errors name its file.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        UNetConfig::from_unet_json(&self.unet).map_err(|e| in_file(&self.root.join("unet/config.json"), e))
    }

    /// The VAE's config (None: the folder has no `vae/` and none was given).
    pub fn vae_config(&self) -> Result<Option<VaeConfig>> {
        vae_config_in(&self.vae)
    }

    /// The training size: `resolution` pixels, or the UNet's `sample_size` times the VAE's
    /// downscale (SD's 8 without a `vae/`); at most [`MAX_RESOLUTION`], a multiple of the
    /// VAE's downscale. The UNet's own downscale is checked by [`Pipeline::controlnet_spec`].
    pub fn training_size(&self, resolution: Option<usize>) -> Result<TrainingSize> {
        let downscale = self.vae_config()?.map_or(SD_VAE_DOWNSCALE, |c| c.downscale());
        TrainingSize::resolve(resolution, || Ok(self.unet_config()?.sample_size), downscale)
    }

    /// Checks that the text encoder (when the folder has one) makes embeddings as wide as the
    /// UNet's cross-attention reads, and that the tokenizer is its pair. For SDXL, the two
    /// encoders together make the UNet's `cross_attention_dim` and the second's projection is
    /// the pooled width `add_embedding` reads.
    pub fn check_text_encoder(&self) -> Result<()> {
        let dir = self.root.join("text_encoder");
        if !dir.is_dir() {
            return Ok(());
        }
        let unet = self.unet_config()?;
        let unet_path = self.root.join("unet/config.json");
        if let Some(text_time) = unet.text_time {
            if !self.root.join("text_encoder_2").is_dir() {
                return Err(bad(
                    &self.root,
                    "its UNet is SDXL's (addition_embed_type \"text_time\") but it has no text_encoder_2/",
                ));
            }
            let (width, pooled) = sdxl_text_widths(&self.root)?;
            if width != unet.cross_attention_dim {
                return Err(bad(
                    &unet_path,
                    format!(
                        "cross_attention_dim {} is not the width of the two text encoders' states together ({width})",
                        unet.cross_attention_dim
                    ),
                ));
            }
            let expected = pooled + TIME_IDS * text_time.time_embed_dim;
            if text_time.input_dim != expected {
                return Err(bad(
                    &unet_path,
                    format!(
                        "projection_class_embeddings_input_dim {} is not text_encoder_2's projection_dim {pooled} + {TIME_IDS} × addition_time_embed_dim {} = {expected}",
                        text_time.input_dim, text_time.time_embed_dim
                    ),
                ));
            }
            return Ok(());
        }
        let path = dir.join("config.json");
        let tokenizer = self.root.join("tokenizer");
        let text = match tokenizer.is_dir() {
            true => read_text_pair(&dir, &tokenizer)?.0,
            false => ClipTextConfig::from_json(&read_json_config(&dir)?).map_err(|e| in_file(&path, e))?,
        };
        if text.hidden_size != unet.cross_attention_dim {
            return Err(bad(
                &path,
                format!(
                    "the text encoder's hidden_size {} is not the UNet's cross_attention_dim {}",
                    text.hidden_size, unet.cross_attention_dim
                ),
            ));
        }
        Ok(())
    }

    /// SDXL's `add_time_ids` for training at `size` with the image's crop at
    /// `crops_coords_top_left` (`[top, left]` px), as train_controlnet_sdxl.py records them:
    /// original size, crop, target size = `[px, px, top, left, px, px]`. None for a UNet
    /// without `text_time`, which takes no crop (a crop other than `[0, 0]` is then an error).
    pub fn add_time_ids(
        &self,
        size: TrainingSize,
        crops_coords_top_left: [usize; 2],
    ) -> Result<Option<[f32; TIME_IDS]>> {
        let [top, left] = crops_coords_top_left;
        if !self.is_sdxl()? {
            if top != 0 || left != 0 {
                return Err(TrainError::setting(
                    "crops_coords_top_left",
                    "only an SDXL UNet (addition_embed_type \"text_time\") takes crop coordinates",
                ));
            }
            return Ok(None);
        }
        if top >= size.pixels || left >= size.pixels {
            return Err(TrainError::setting(
                "crops_coords_top_left",
                format!("[{top}, {left}] is outside the {} px image", size.pixels),
            ));
        }
        let px = size.pixels as f32;
        Ok(Some([px, px, top as f32, left as f32, px, px]))
    }

    /// The sd model that trains a ControlNet for this pipeline's UNet at `size`: the
    /// ControlNet's config from the folder `controlnet` (None: the UNet's encoder, as
    /// diffusers' `from_unet`), the frozen networks stored as `precision` says, the LISA
    /// decoder as `decoder` says. Checked whole (every config, the ControlNet against the UNet,
    /// the hook, the latent side against the UNet's downscale) before anything is allocated;
    /// the text embeddings come later ([`SdModel::read_text_embeddings`]). An SDXL UNet's
    /// samples get the time ids of [`Pipeline::add_time_ids`] with `crops_coords_top_left`.
    pub fn controlnet_spec(
        &self,
        controlnet: Option<&Path>,
        (size, crops_coords_top_left): (TrainingSize, [usize; 2]),
        precision: MixedPrecision,
        decoder: &DecoderConfig,
    ) -> Result<ModelSpec> {
        let unet = self.unet_config()?;
        if let Some(vae) = self.vae_config()?
            && vae.latent_channels != unet.in_channels
        {
            return Err(bad(
                &self.vae.join("config.json"),
                format!("makes {} latent channels; the UNet reads {}", vae.latent_channels, unet.in_channels),
            ));
        }
        let add_time_ids = self.add_time_ids(size, crops_coords_top_left)?;
        let controlnet = match controlnet {
            Some(dir) => Some(read_json_config(dir)?),
            None => None,
        };
        let spec = SdSpec {
            unet: self.unet.clone(),
            controlnet,
            conditioning_scale: 1.0,
            prediction: self.prediction,
            text_embeddings: None,
            text_embeddings_sha256: None,
            pooled_text_embeddings: None,
            pooled_text_embeddings_sha256: None,
            add_time_ids,
            latent_size: size.chosen.then_some(size.latent_side),
            mixed_precision: precision,
        };
        spec.validate(decoder).map_err(|e| match e {
            TrainError::Config(m) if m.starts_with("latent side") => {
                TrainError::setting("resolution", format!("{} px: {m}", size.pixels))
            }
            other => other,
        })?;
        Ok(spec.to_spec(decoder))
    }

    /// Builds `spec` (from [`Pipeline::controlnet_spec`]) on `device` and loads the UNet's
    /// weights, then the ControlNet's from `controlnet` (None: the ControlNet is the UNet's
    /// encoder). Every weight file is checked (names, shapes, values) as it is read.
    pub fn build<B: Backend>(
        &self,
        spec: &ModelSpec,
        parts: Parts,
        controlnet: Option<&Path>,
        device: B::Device,
        seed: u64,
    ) -> Result<SdModel<B>> {
        let mut model = SdModel::<B>::new(spec, parts, device, seed)?;
        model.load_main(&self.unet_dir())?;
        if let Some(dir) = controlnet {
            model.load_controlnet(dir)?;
        }
        Ok(model)
    }
}

/// A config error said about the file it came from.
pub(crate) fn in_file(path: &Path, e: TrainError) -> TrainError {
    match e {
        // "vae config.json: …" and the like: the path says which config.json.
        TrainError::Config(m) => {
            bad(path, m.split_once("config.json: ").map_or(m.clone(), |(_, rest)| rest.to_string()))
        }
        other => other,
    }
}

/// diffusers' scheduler config → lisa's noise process and prediction.
fn noise_of(path: &Path, c: &Map<String, Value>) -> Result<(NoiseConfig, Prediction)> {
    let num = |k: &str, default: f64| -> Result<f64> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad(path, format!("{k} = {v} is not a number"))),
        }
    };
    let text = |k: &str, default: &str| -> Result<String> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(bad(path, format!("{k} = {v} is not a string"))),
        }
    };
    let (start, end) = (num("beta_start", 0.0001)?, num("beta_end", 0.02)?);
    let betas = match text("beta_schedule", "linear")?.as_str() {
        "linear" => BetaSchedule::Linear { start, end },
        "scaled_linear" => BetaSchedule::ScaledLinear { start, end },
        "squaredcos_cap_v2" => BetaSchedule::COSINE,
        other => {
            return Err(bad(
                path,
                format!("beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
            ));
        }
    };
    if c.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return Err(bad(path, "trained_betas is not supported"));
    }
    if c.get("rescale_betas_zero_snr").and_then(Value::as_bool) == Some(true) {
        return Err(bad(path, "rescale_betas_zero_snr = true is not supported"));
    }
    let steps = num("num_train_timesteps", 1000.0)?;
    if !(steps >= 2.0 && steps.fract() == 0.0 && steps <= 1e6) {
        return Err(bad(path, format!("num_train_timesteps = {steps} is not a count of steps")));
    }
    let prediction = match text("prediction_type", "epsilon")?.as_str() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::V,
        "sample" => Prediction::Sample,
        other => {
            return Err(bad(
                path,
                format!("prediction_type {other:?} is not supported (epsilon, v_prediction, sample)"),
            ));
        }
    };
    Ok((NoiseConfig::Diffusion { betas, num_train_timesteps: steps as usize }, prediction))
}
