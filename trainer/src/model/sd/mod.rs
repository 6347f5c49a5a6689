//! Stable Diffusion 1.x/2.x (`architecture = "sd"`): diffusers' `UNet2DConditionModel` as
//! the frozen main network, `ControlNetModel` as the side network, and the LISA decoder
//! hooked at the input of a ControlNet zero conv. Built from diffusers `config.json` files
//! and loaded from / saved to diffusers folders with diffusers' tensor names.
//!
//! Parameter names: `main.<UNet name>`, `side.<ControlNet name>`, `lisa.*`.
//! Hooks: `down_i` = the input of `controlnet_down_blocks[i]` (`down_0` … `down_11` in SD,
//! `down_0` … `down_8` in SDXL), `mid` = the input of `controlnet_mid_block` (the LISA
//! authors' naming).
//!
//! SDXL is this architecture with a UNet of `addition_embed_type = "text_time"`: its prompts
//! carry a pooled text embedding too, and every sample the six micro-conditioning ids.

mod blocks;
mod clip;
mod config;
mod controlnet;
mod encoders;
mod folder;
mod pipeline;
mod sdxl_text;
mod text;
mod text_time;
mod tokenizer;
mod unet;
mod vae;

use std::path::Path;

use lisa_core::Prediction;
use lisa_core::backend::{Backend, DType, Shape};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use blocks::{SpatialTransformer, TRANSFORMER_GROUP_NORM_EPS, timestep_embedding};
pub use clip::{ClipTextConfig, ClipTextModel, ProjectedText, load_clip};
pub use config::{
    ControlNetExtras, DownBlockType, MAX_IO_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS, MAX_SAMPLE_SIZE, MAX_WIDTH,
    ParameterEstimate, PerBlock, TIME_IDS, TextTimeConfig, UNetConfig, UpBlockType,
};
pub(crate) use config::{check_keys as check_config_keys, get as config_value};
pub use controlnet::{ConditioningEmbedding, SdControlNet};
pub(crate) use encoders::cast_all as cast_frozen;
pub use encoders::{TextEmbeddings, TextEncoder, Vae, read_text_pair};
pub use folder::{
    read_diffusers_weights, read_json_config, read_transformers_weights, save_controlnet, write_diffusers_folder,
};
pub(crate) use pipeline::in_file as config_error_in;
pub use pipeline::{MAX_RESOLUTION, Pipeline, TrainingSize, folder_vae_config};
pub use sdxl_text::{SdxlTextEncoders, sdxl_text_widths};
pub use text::{PromptTable, encode_prompt_tables};
pub use text_time::{AddedConditions, TextTimeEmbedding, TimeConditioning};
pub use tokenizer::{ClipTokenizer, Encoded as TokenIds};
pub(crate) use tokenizer::{read_json as read_tokenizer_json, token_field as special_token};
pub use unet::{Encoded, SdUNet};
pub use vae::{AutoencoderKl, SD_VAE_DOWNSCALE, VAE_NORM_EPS, VaeConfig, latent_side, load_vae, modern_attention_name};

use super::{
    Conditioning, DECODER, DecoderConfig, DualDenoiser, DualParts, HookLayer, LisaDecoder, MAIN, MainEncoding,
    ModelSpec, Parts, PromptEmbedding, Residuals, SIDE, SideOutput,
};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, Scope};
use crate::weights::load_tensors;

/// The registry name.
pub const NAME: &str = "sd";
/// Level-0 feature maps per sample [`SdSpec::training_bytes`] counts (SD keeps several dozen).
pub const ACTIVATIONS_KEPT: u128 = 16;
/// The side layer the LISA decoder reads when the run file names none (the input of `controlnet_down_blocks[5]`, as the LISA authors').
pub const DEFAULT_HOOK: HookLayer = HookLayer::Down(5);

/// The `[model]` keys of the sd architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdSpec {
    /// The UNet's diffusers `config.json`, as read.
    pub unet: Map<String, Value>,
    /// The ControlNet's diffusers `config.json` (None: `from_unet` with diffusers' defaults).
    #[serde(default)]
    pub controlnet: Option<Map<String, Value>>,
    /// The residual multiplier during training (diffusers' `conditioning_scale`, 1).
    #[serde(default = "one")]
    pub conditioning_scale: f32,
    /// What the UNet predicts (the scheduler config's `prediction_type`; epsilon).
    #[serde(default)]
    pub prediction: Prediction,
    /// The precomputed text embeddings (a safetensors file, one `[tokens, dim]` tensor per
    /// prompt, named by the prompt; `""` the null prompt), read when the model is built.
    #[serde(default)]
    pub text_embeddings: Option<std::path::PathBuf>,
    /// The SHA-256 of the text embeddings file: filled in when the model reads it, checked
    /// when given (a checkpoint records the embeddings by content, not by path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_embeddings_sha256: Option<String>,
    /// SDXL: the prompts' pooled text embeddings (`text_encoder_2`'s projected output, one
    /// `[1, pooled_dim]` tensor per prompt, named as in `text_embeddings`), read when the
    /// model is built; needed by a UNet with `addition_embed_type = "text_time"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled_text_embeddings: Option<std::path::PathBuf>,
    /// The SHA-256 of `pooled_text_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled_text_embeddings_sha256: Option<String>,
    /// SDXL: the micro-conditioning ids of every sample, `[original height, original width,
    /// crop top, crop left, target height, target width]` in pixels (train_controlnet_sdxl.py's
    /// `add_time_ids`); default: the trained resolution, uncropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_time_ids: Option<[f32; TIME_IDS]>,
    /// The latent side trained at, when not the UNet's `sample_size` (`--resolution` / the
    /// VAE's downscale).
    #[serde(default)]
    pub latent_size: Option<usize>,
    /// The frozen UNet's storage type.
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

fn one() -> f32 {
    1.0
}

/// The storage type of the frozen networks (diffusers' `--mixed_precision`): the UNet (and,
/// in the command, the VAE and the text encoder) in half precision; the ControlNet, the LISA
/// decoder and the optimizer state stay in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// IEEE half.
    Fp16,
    /// bfloat16.
    Bf16,
}

impl MixedPrecision {
    /// The flag's value: `no`, `fp16`, `bf16`.
    pub fn flag(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    /// The storage type of the frozen networks.
    pub fn dtype(self) -> DType {
        match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Fp16 => DType::F16,
            MixedPrecision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for MixedPrecision {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "no" => Ok(Self::No),
            "fp16" => Ok(Self::Fp16),
            "bf16" => Ok(Self::Bf16),
            other => Err(TrainError::Config(format!("mixed precision {other:?}: no | fp16 | bf16"))),
        }
    }
}

/// The parsed settings.
#[derive(Debug, Clone)]
struct Resolved {
    unet: UNetConfig,
    controlnet: UNetConfig,
    extras: ControlNetExtras,
}

impl SdSpec {
    /// Reads the architecture keys of `spec`.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        serde_json::from_value(Value::Object(spec.config.clone()))
            .map_err(|e| TrainError::Config(format!("[model] of the sd architecture: {e}")))
    }

    /// [`ModelSpec::identity`]'s part for sd: the embeddings' path goes where their digest
    /// pins their contents, and diffusers' `_name_or_path` (where a config was loaded from)
    /// goes from the UNet's and the ControlNet's configs.
    pub fn remove_locations(config: &mut Map<String, Value>) {
        for key in ["text_embeddings", "pooled_text_embeddings"] {
            if config.get(&format!("{key}_sha256")).is_some_and(Value::is_string) {
                config.remove(key);
            }
        }
        for part in ["unet", "controlnet"] {
            if let Some(Value::Object(c)) = config.get_mut(part) {
                c.remove("_name_or_path");
            }
        }
    }

    /// This configuration as a [`ModelSpec`].
    pub fn to_spec(&self, decoder: &DecoderConfig) -> ModelSpec {
        let config = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Default::default(),
        };
        ModelSpec { architecture: NAME.to_string(), decoder: decoder.clone(), config }
    }

    fn resolve(&self) -> Result<Resolved> {
        // A config error says whose config.json it is about.
        let whose = |part: &'static str| {
            move |e: TrainError| match e {
                TrainError::Config(m) => TrainError::Config(format!("the {part}'s {m}")),
                other => other,
            }
        };
        let unet = UNetConfig::from_unet_json(&self.unet).map_err(whose("UNet"))?;
        let (controlnet, extras) = match &self.controlnet {
            Some(c) => UNetConfig::from_controlnet_json(c).map_err(whose("ControlNet"))?,
            None => UNetConfig::from_controlnet_json(&controlnet_from_unet(&self.unet)).map_err(whose("UNet"))?,
        };
        let mismatches = unet.controlnet_mismatches(&controlnet);
        if !mismatches.is_empty() {
            return Err(TrainError::Config(format!("the ControlNet does not fit the UNet: {}", mismatches.join(", "))));
        }
        if let Some(side) = self.latent_size {
            let factor = 1usize << (unet.block_out_channels.len() - 1);
            if side == 0 || !side.is_multiple_of(factor) {
                return Err(TrainError::Config(format!(
                    "latent side {side} must be a positive multiple of {factor} (the UNet's downscale)"
                )));
            }
        }
        if !self.conditioning_scale.is_finite() {
            return Err(TrainError::Config("conditioning_scale must be finite".into()));
        }
        if let Some(ids) = self.add_time_ids {
            if unet.text_time.is_none() {
                return Err(TrainError::Config(
                    "add_time_ids are read by an SDXL UNet (addition_embed_type \"text_time\"); this UNet has none"
                        .into(),
                ));
            }
            if ids.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(TrainError::Config(format!("add_time_ids {ids:?} must be finite and not negative")));
            }
        }
        if self.pooled_text_embeddings.is_some() && unet.text_time.is_none() {
            return Err(TrainError::Config(
                "pooled_text_embeddings are read by an SDXL UNet (addition_embed_type \"text_time\"); this UNet has none"
                    .into(),
            ));
        }
        Ok(Resolved { unet, controlnet, extras })
    }

    /// Checks the configs and that the hook names a zero conv of this ControlNet.
    pub fn validate(&self, decoder: &DecoderConfig) -> Result<()> {
        let r = self.resolve()?;
        hook_shape(&r.unet, decoder.hook_or(DEFAULT_HOOK)).map(|_| ())
    }

    /// About how many parameters the UNet and its ControlNet hold
    /// ([`UNetConfig::parameter_estimate`]).
    pub fn parameter_estimate(&self) -> Result<ParameterEstimate> {
        Ok(self.resolve()?.unet.parameter_estimate())
    }

    /// About how many bytes training this model takes, before anything is allocated: the
    /// frozen UNet in its storage type; the ControlNet's weights, gradients and two AdamW
    /// moments in f32 (and its EMA with `ema`); and per sample of a `batch`, the activations
    /// the backward keeps (about [`ACTIVATIONS_KEPT`] feature maps of the widest level-0 size,
    /// a floor, not a bound).
    pub fn training_bytes(&self, batch: usize, ema: bool) -> Result<u128> {
        let r = self.resolve()?;
        let params = r.unet.parameter_estimate();
        let main_bytes = self.mixed_precision.dtype().size_bytes() as u128;
        let side = self.latent_size.unwrap_or(r.unet.sample_size) as u128;
        let level0 = r.unet.block_out_channels[0] as u128 * side * side * 4;
        let side_bytes = if ema { 20 } else { 16 };
        Ok(params.unet * main_bytes + params.controlnet * side_bytes + batch as u128 * ACTIVATIONS_KEPT * level0)
    }
}

/// The ControlNet `config.json` diffusers' `from_unet` derives from a UNet's.
fn controlnet_from_unet(unet: &Map<String, Value>) -> Map<String, Value> {
    let drop = ["out_channels", "up_block_types", "sample_size", "center_input_sample"];
    unet.iter().filter(|(k, _)| !drop.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// `(channels, side)` of the ControlNet feature a hook reads, at the UNet's `sample_size`.
fn hook_shape(u: &UNetConfig, hook: HookLayer) -> Result<(usize, usize)> {
    let levels = u.block_out_channels.len();
    // Skip i's (channels, level): conv_in, then per level its resnets and its downsampler.
    let mut skips = vec![(u.block_out_channels[0], 0)];
    for (l, &c) in u.block_out_channels.iter().enumerate() {
        skips.extend(std::iter::repeat_n((c, l), u.layers_per_block));
        if l + 1 < levels {
            skips.push((c, l + 1));
        }
    }
    let (c, level) = match hook {
        HookLayer::Mid => (u.block_out_channels[levels - 1], levels - 1),
        HookLayer::Down(i) => *skips.get(i).ok_or_else(|| {
            TrainError::Config(format!(
                "hook down_{i} does not exist: this ControlNet has down_0..down_{}",
                skips.len() - 1
            ))
        })?,
        HookLayer::Block(_) | HookLayer::SingleBlock(_) => {
            return Err(TrainError::Config(format!(
                "hook {hook}: a UNet ControlNet's hooks are down_0..down_{} and mid",
                skips.len() - 1
            )));
        }
    };
    Ok((c, (u.sample_size >> level).max(1)))
}

/// The SD dual-branch model.
pub struct SdModel<B: Backend> {
    dual: DualParts<B>,
    unet: SdUNet,
    controlnet: Option<SdControlNet>,
    spec: SdSpec,
    resolved: Resolved,
    prompts: Option<PromptTable>,
    /// SDXL's pooled text embeddings, beside `prompts`.
    pooled: Option<PromptTable>,
    /// A ControlNet was loaded: loading the UNet afterwards must not copy its encoder over it.
    side_loaded: bool,
}

impl<B: Backend> SdModel<B> {
    /// The prompts' text embeddings (an error when the model was given none).
    fn prompt_table(&self) -> Result<&PromptTable> {
        self.prompts.as_ref().ok_or_else(|| {
            TrainError::Config(
                "the sd model reads precomputed text embeddings (text_embeddings = a safetensors file of one tensor per prompt); none were given".into(),
            )
        })
    }

    /// Builds the parts of `spec` with seeded initial weights; the ControlNet starts as a
    /// copy of the UNet's `conv_in`, time embedding, down and middle blocks (`from_unet`).
    pub fn new(spec: &ModelSpec, parts: Parts, device: B::Device, seed: u64) -> Result<Self> {
        let mut sd = SdSpec::from_spec(spec)?;
        let resolved = sd.resolve()?;
        let mut store = DualParts::new_store(device, seed, parts);
        let unet = SdUNet::new(&mut store, MAIN, &resolved.unet)?;
        let (mut controlnet, mut decoder) = (None, None);
        if let Parts::Dual { decoder: with_decoder } = parts {
            controlnet = Some(SdControlNet::new(&mut store, SIDE, &resolved.controlnet, &resolved.extras)?);
            if with_decoder {
                let hooked = hook_shape(&resolved.unet, spec.decoder.hook_or(DEFAULT_HOOK))?;
                let out = (resolved.unet.out_channels, resolved.unet.sample_size);
                decoder = Some(LisaDecoder::new(&mut store, DECODER, &spec.decoder, hooked, out)?);
            }
        }
        let (prompts, pooled) = read_prompts(&mut sd, &resolved.unet)?;
        let dual = DualParts { store, parts, decoder, decoder_config: spec.decoder.resolved(DEFAULT_HOOK) };
        let mut model = Self { dual, unet, controlnet, spec: sd, resolved, prompts, pooled, side_loaded: false };
        model.copy_main_into_side()?;
        model.dual.cast_main(model.spec.mixed_precision.dtype())?;
        Ok(model)
    }

    /// Reads the prompts' precomputed text embeddings from `path` (a safetensors file, one
    /// `[tokens, cross_attention_dim]` tensor per prompt) and, for SDXL, their pooled text
    /// embeddings from `pooled` (one `[1, pooled_dim]` tensor per prompt); the model's spec
    /// then records them by their digests.
    pub fn read_text_embeddings(&mut self, path: &Path, pooled: Option<&Path>) -> Result<()> {
        let mut spec = self.spec.clone();
        spec.text_embeddings = Some(path.to_path_buf());
        spec.pooled_text_embeddings = pooled.map(Path::to_path_buf);
        spec.text_embeddings_sha256 = None;
        spec.pooled_text_embeddings_sha256 = None;
        (self.prompts, self.pooled) = read_prompts(&mut spec, &self.resolved.unet)?;
        self.spec = spec;
        Ok(())
    }

    /// SDXL's micro-conditioning ids of every sample: `add_time_ids`, or the trained
    /// resolution uncropped (None: the UNet has no `text_time`).
    pub fn add_time_ids(&self) -> Option<[f32; TIME_IDS]> {
        self.resolved.unet.text_time?;
        let side = self.sample_shape()[1] * SD_VAE_DOWNSCALE;
        let s = side as f32;
        Some(self.spec.add_time_ids.unwrap_or([s, s, 0.0, 0.0, s, s]))
    }

    /// The UNet's settings.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.resolved.unet
    }

    /// The ControlNet's extra settings.
    pub fn controlnet_extras(&self) -> &ControlNetExtras {
        &self.resolved.extras
    }

    /// The main UNet.
    pub fn unet(&self) -> &SdUNet {
        &self.unet
    }

    /// The ControlNet (None: built as the prior alone).
    pub fn controlnet(&self) -> Result<&SdControlNet> {
        self.controlnet.as_ref().ok_or_else(|| TrainError::Config("this model was built without the ControlNet".into()))
    }

    /// `from_unet`: `side.{conv_in,time_embedding,add_embedding,down_blocks,mid_block}.*` ←
    /// `main.…`.
    fn copy_main_into_side(&mut self) -> Result<()> {
        if self.controlnet.is_none() {
            return Ok(());
        }
        const COPIED: [&str; 5] = ["conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."];
        let side = Scope::from(SIDE);
        let pairs: Vec<_> = self
            .dual
            .store
            .iter()
            .filter_map(|(id, p)| {
                let rest = p.name.strip_prefix(MAIN)?;
                COPIED.iter().any(|c| rest.starts_with(c)).then(|| (id, side.name(rest)))
            })
            .collect();
        for (src, dst_name) in pairs {
            let dst = self
                .dual
                .store
                .find(&dst_name)
                .ok_or_else(|| TrainError::Config(format!("the ControlNet has no {dst_name}")))?;
            let value = self.dual.store.get(src).value.clone();
            self.dual.store.get_mut(dst).value = value;
        }
        Ok(())
    }

    /// Loads a diffusers ControlNet folder (or weights file) into `side.*`: a trained
    /// ControlNet to continue from. Every tensor must be there, with the model's shapes.
    pub fn load_controlnet(&mut self, path: &Path) -> Result<usize> {
        self.controlnet()?;
        let (file, tensors) = read_diffusers_weights(path)?;
        let side = Scope::from(SIDE);
        let tensors = tensors.into_iter().map(|(k, v)| (side.name(k), v)).collect();
        let n = load_tensors(&mut self.dual.store, &file, tensors, |n| n.starts_with(SIDE), |_| false)?;
        self.side_loaded = true;
        Ok(n)
    }

    /// Writes the ControlNet as a diffusers folder (`config.json`, f32
    /// `diffusion_pytorch_model.safetensors`) that `ControlNetModel.from_pretrained` loads.
    pub fn save_controlnet(&self, dir: &Path) -> Result<()> {
        self.controlnet()?;
        let config = self.resolved.controlnet.controlnet_json(&self.resolved.extras);
        save_controlnet(&self.dual.store, SIDE, &config, dir)
    }

    /// The text context `[n, tokens, dim]` of `cond` and, for SDXL, its added conditions
    /// (the pooled text and the time ids).
    fn context(&self, cond: &Conditioning, device: &B::Device) -> Result<(B::Tensor, Option<AddedConditions>)> {
        let u = &self.resolved.unet;
        let n = cond.t.len();
        let (values, tokens, dim, pooled) = match &cond.prompt {
            PromptEmbedding::Text { values, tokens, dim } => (values, *tokens, *dim, None),
            PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } => {
                (values, *tokens, *dim, Some((pooled, *pooled_dim)))
            }
            _ => return Err(TrainError::Mismatch("the sd model reads text embeddings, not class ids".into())),
        };
        if dim != u.cross_attention_dim || values.len() != n * tokens * dim {
            return Err(TrainError::Mismatch(format!(
                "text embeddings of {} values as [{n}, {tokens}, {dim}]: the UNet reads [{n}, tokens, {}]",
                values.len(),
                u.cross_attention_dim
            )));
        }
        let context = B::from_slice(values, &Shape::new([n, tokens, dim]), DType::F32, device)?;
        let added = match (u.text_time, pooled, self.add_time_ids()) {
            (None, None, _) => None,
            (Some(tt), Some((pooled, pooled_dim)), Some(ids)) => {
                if pooled_dim != tt.pooled_dim() || pooled.len() != n * pooled_dim {
                    return Err(TrainError::Mismatch(format!(
                        "pooled text embeddings of {} values as [{n}, {pooled_dim}]: the UNet reads [{n}, {}]",
                        pooled.len(),
                        tt.pooled_dim()
                    )));
                }
                Some(AddedConditions { text_embeds: pooled.clone(), time_ids: ids.repeat(n) })
            }
            (Some(_), _, _) => {
                return Err(TrainError::Mismatch(
                    "this SDXL UNet (addition_embed_type \"text_time\") reads text embeddings with pooled ones (PromptEmbedding::TextPooled)".into(),
                ));
            }
            (None, Some(_), _) => {
                return Err(TrainError::Mismatch(
                    "pooled text embeddings were given to a UNet without addition_embed_type \"text_time\"".into(),
                ));
            }
        };
        Ok((context, added))
    }
}

/// Reads the spec's prompt tables (the pooled one only with the text one, and for SDXL
/// always with it), checks them against their recorded digests and records the digests.
fn read_prompts(spec: &mut SdSpec, u: &UNetConfig) -> Result<(Option<PromptTable>, Option<PromptTable>)> {
    let text = match &spec.text_embeddings {
        Some(path) => PromptTable::read(path, u.cross_attention_dim)?,
        None if spec.pooled_text_embeddings.is_some() => {
            return Err(TrainError::Config("pooled_text_embeddings were given without text_embeddings".into()));
        }
        None => return Ok((None, None)),
    };
    let pooled = match (&spec.pooled_text_embeddings, u.text_time) {
        (Some(path), Some(tt)) => {
            let pooled = PromptTable::read(path, tt.pooled_dim())?;
            if pooled.tokens != 1 {
                return Err(crate::weights::bad(
                    &pooled.path,
                    format!(
                        "holds [{}, {}] tensors; pooled text embeddings are [1, {}]",
                        pooled.tokens, pooled.dim, pooled.dim
                    ),
                ));
            }
            Some(pooled)
        }
        (None, Some(_)) => {
            return Err(TrainError::Config(
                "an SDXL UNet (addition_embed_type \"text_time\") reads pooled_text_embeddings beside text_embeddings; none were given".into(),
            ));
        }
        (Some(_), None) => {
            return Err(TrainError::Config(
                "pooled_text_embeddings are read by an SDXL UNet (addition_embed_type \"text_time\"); this UNet has none"
                    .into(),
            ));
        }
        (None, None) => None,
    };
    text.pin(&mut spec.text_embeddings_sha256)?;
    if let Some(p) = &pooled {
        p.pin(&mut spec.pooled_text_embeddings_sha256)?;
    }
    Ok((Some(text), pooled))
}

impl<B: Backend> DualDenoiser<B> for SdModel<B> {
    fn dual(&self) -> &DualParts<B> {
        &self.dual
    }

    fn dual_mut(&mut self) -> &mut DualParts<B> {
        &mut self.dual
    }

    fn architecture(&self) -> &'static str {
        NAME
    }

    fn spec(&self) -> ModelSpec {
        self.spec.to_spec(&self.dual.decoder_config)
    }

    fn sample_shape(&self) -> [usize; 3] {
        let u = &self.resolved.unet;
        let side = self.spec.latent_size.unwrap_or(u.sample_size);
        [u.out_channels, side, side]
    }

    fn hint_channels(&self) -> usize {
        self.resolved.extras.conditioning_channels
    }

    fn prediction(&self) -> Prediction {
        self.spec.prediction
    }

    fn conditioning_scale(&self) -> f32 {
        self.spec.conditioning_scale
    }

    /// The prompts' precomputed text embeddings ([`PromptTable`]), with the pooled ones for
    /// SDXL; the text encoders run before training, not in the model.
    fn embed_prompts(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        let table = self.prompt_table()?;
        let (values, tokens, dim) = (table.lookup(prompts)?, table.tokens, table.dim);
        Ok(match &self.pooled {
            Some(pooled) => PromptEmbedding::TextPooled {
                values,
                tokens,
                dim,
                pooled: pooled.lookup(prompts)?,
                pooled_dim: pooled.dim,
            },
            None => PromptEmbedding::Text { values, tokens, dim },
        })
    }

    /// Every prompt is in the tables (their names only are read).
    fn check_prompts(&self, prompts: &[&str]) -> Result<()> {
        let table = self.prompt_table()?;
        table.check(prompts)?;
        self.pooled.as_ref().map_or(Ok(()), |pooled| pooled.check(prompts))
    }

    fn latent_space(&self) -> bool {
        true
    }

    fn hint_shape(&self) -> [usize; 3] {
        let f = 1 << (self.resolved.extras.conditioning_embedding_out_channels.len() - 1);
        let s = self.sample_shape()[1] * f;
        [self.resolved.extras.conditioning_channels, s, s]
    }

    fn load_side(&mut self, path: &Path) -> Result<usize> {
        self.load_controlnet(path)
    }

    fn export_side(&self, dir: &Path) -> Result<bool> {
        self.save_controlnet(dir).map(|()| true)
    }

    fn encode_main(&self, p: &Bound<'_, B>, x_t: &Var<B>, cond: &Conditioning) -> Result<MainEncoding<B>> {
        let (context, added) = self.context(cond, &B::device(&x_t.value))?;
        let context = p.tape.constant(context);
        let enc = self.unet.encode(p, x_t, &cond.t, &context, added.as_ref())?;
        Ok(MainEncoding { temb: enc.temb, context: Some(context), skips: enc.skips })
    }

    fn decode_main(
        &self,
        p: &Bound<'_, B>,
        enc: &MainEncoding<B>,
        residuals: Option<(&Residuals<B>, f32)>,
    ) -> Result<Var<B>> {
        let context = enc.context.as_ref().ok_or(TrainError::Internal("an sd encoding carries the prompt context"))?;
        let encoded = Encoded { temb: enc.temb.clone(), skips: enc.skips.clone() };
        self.unet.decode(p, &encoded, context, residuals)
    }

    fn side(&self, p: &Bound<'_, B>, x_t: &Var<B>, hint: &Var<B>, cond: &Conditioning) -> Result<SideOutput<B>> {
        let (context, added) = self.context(cond, &B::device(&x_t.value))?;
        let context = p.tape.constant(context);
        self.controlnet()?.forward(p, x_t, hint, &cond.t, &context, added.as_ref())
    }

    /// Reads a diffusers UNet folder (`diffusion_pytorch_model.safetensors`, or the sharded
    /// index) or weights file into `main.*`, then initialises the ControlNet from it unless a
    /// ControlNet was loaded already (the order of the two loads does not matter).
    fn load_main(&mut self, path: &Path) -> Result<usize> {
        let (file, tensors) = read_diffusers_weights(path)?;
        let main = Scope::from(MAIN);
        let tensors = tensors.into_iter().map(|(k, v)| (main.name(k), v)).collect();
        let n = load_tensors(&mut self.dual.store, &file, tensors, |n| n.starts_with(MAIN), |_| false)?;
        if !self.side_loaded {
            self.copy_main_into_side()?;
        }
        self.dual.cast_main(self.spec.mixed_precision.dtype())?;
        Ok(n)
    }
}
