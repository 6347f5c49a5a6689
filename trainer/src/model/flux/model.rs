//! The `flux` architecture: diffusers' `FluxTransformer2DModel` as the frozen main network of
//! a flow-matching model, `FluxControlNetModel` as the side network, and the LISA decoder
//! hooked at the input of a ControlNet's `controlnet_blocks[i]` (`block_i`) or
//! `controlnet_single_blocks[i]` (`single_block_i`), decoding the hooked image tokens back to
//! latent 2×2 patches. τ is in velocity units (`target − prior`, the target `noise − x₀`).
//!
//! Parameter names: `main.<transformer name>`, `side.<ControlNet name>`, `lisa.*`.
//! The main encoding is the transformer's embeddings (image tokens, the timestep + guidance +
//! pooled-text modulation input, the projected text tokens): the prior pass of LISA reuses
//! them and runs the blocks again without residuals.

use std::path::{Path, PathBuf};

use lisa_core::Prediction;
use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    Embedded, FluxConfig, FluxControlNet, FluxControlNetExtras, FluxInputs, FluxResiduals, FluxTransformer,
    copy_transformer_into_controlnet, load_weights,
};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::sd::{MixedPrecision, PromptTable, write_diffusers_folder};
use crate::model::sd3::{check_pooled_text, lookup_pooled_text, pooled_text_tensors, read_prompt_pair};
use crate::model::{
    Conditioning, DECODER, DecoderConfig, DualDenoiser, DualParts, HookLayer, LisaDecoder, MAIN, MainEncoding,
    ModelSpec, Parts, PromptEmbedding, Residuals, SIDE, SideOutput, Skips,
};
use crate::params::{Bound, Scope};

/// The registry name.
pub const NAME: &str = "flux";
/// The side layer the LISA decoder reads when the run file names none: the first ControlNet
/// block, the one every Flux ControlNet has.
pub const DEFAULT_HOOK: HookLayer = HookLayer::Block(0);
/// Double- and single-stream blocks of a ControlNet made from the transformer when the spec
/// names none (train_controlnet_flux.py's `--num_double_layers 4 --num_single_layers 4`).
pub const DEFAULT_CONTROLNET_LAYERS: (usize, usize) = (4, 4);
/// The guidance scale a guidance-distilled transformer (Flux-dev) trains with when the spec
/// names none (train_controlnet_flux.py's `--guidance_scale`).
pub const DEFAULT_GUIDANCE_SCALE: f32 = 3.5;
/// The latent side trained at when the spec names none: train_controlnet_flux.py's default of
/// 512 px (64 latents).
pub const DEFAULT_LATENT_SIZE: usize = 64;

/// The `[model]` keys of the flux architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxSpec {
    /// The transformer's diffusers `config.json`, as read.
    pub transformer: Map<String, Value>,
    /// The ControlNet's diffusers `config.json` (None: `from_transformer` with
    /// `controlnet_layers` and `controlnet_single_layers` blocks).
    #[serde(default)]
    pub controlnet: Option<Map<String, Value>>,
    /// Double-stream blocks of a ControlNet made from the transformer (None: 4).
    #[serde(default)]
    pub controlnet_layers: Option<usize>,
    /// Single-stream blocks of a ControlNet made from the transformer (None: 4).
    #[serde(default)]
    pub controlnet_single_layers: Option<usize>,
    /// Union mode: the control type every training sample is (needed exactly when the
    /// ControlNet has `num_mode`).
    #[serde(default)]
    pub control_mode: Option<usize>,
    /// The guidance scale of a transformer with `guidance_embeds` (None: 3.5); none for one
    /// without.
    #[serde(default)]
    pub guidance_scale: Option<f32>,
    /// The residual multiplier during training (1).
    #[serde(default = "one")]
    pub conditioning_scale: f32,
    /// The prompts' precomputed text tokens (a safetensors file, one `[tokens,
    /// joint_attention_dim]` tensor per prompt, named by the prompt; `""` the null prompt):
    /// Flux's T5 `prompt_embeds`.
    #[serde(default)]
    pub text_embeddings: Option<PathBuf>,
    /// The SHA-256 of `text_embeddings`, filled in when read, checked when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_embeddings_sha256: Option<String>,
    /// The prompts' pooled CLIP text (one `[1, pooled_projection_dim]` tensor per prompt).
    #[serde(default)]
    pub pooled_text_embeddings: Option<PathBuf>,
    /// The SHA-256 of `pooled_text_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled_text_embeddings_sha256: Option<String>,
    /// The latent side trained at (None: 64, 512 px); even.
    #[serde(default)]
    pub latent_size: Option<usize>,
    /// The frozen transformer's storage type (and autocast).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
}

fn one() -> f32 {
    1.0
}

/// The parsed settings.
#[derive(Debug, Clone)]
struct Resolved {
    transformer: FluxConfig,
    controlnet: FluxConfig,
    extras: FluxControlNetExtras,
    /// The latent side.
    side: usize,
    /// The guidance scale (None: the transformer has no guidance embedding).
    guidance: Option<f32>,
}

impl Resolved {
    /// The parameters of the transformer and of the ControlNet.
    fn parameter_counts(&self) -> (u128, u128) {
        (self.transformer.parameter_count(None), self.controlnet.parameter_count(Some(self.extras)))
    }
}

impl FluxSpec {
    /// Reads the architecture keys of `spec`.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        serde_json::from_value(Value::Object(spec.config.clone()))
            .map_err(|e| TrainError::Config(format!("[model] of the flux architecture: {e}")))
    }

    /// This configuration as a [`ModelSpec`].
    pub fn to_spec(&self, decoder: &DecoderConfig) -> ModelSpec {
        let config = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Default::default(),
        };
        ModelSpec { architecture: NAME.to_string(), decoder: decoder.clone(), config }
    }

    /// [`ModelSpec::identity`]'s part for flux: the same keys as sd3's.
    pub fn remove_locations(config: &mut Map<String, Value>) {
        crate::model::sd3::Sd3Spec::remove_locations(config);
    }

    fn resolve(&self) -> Result<Resolved> {
        let whose = |part: &'static str| {
            move |e: TrainError| match e {
                TrainError::Config(m) => TrainError::Config(format!("the {part}'s {m}")),
                other => other,
            }
        };
        let transformer = FluxConfig::from_transformer_json(&self.transformer).map_err(whose("transformer"))?;
        let (controlnet, extras) = match &self.controlnet {
            Some(c) => {
                if self.controlnet_layers.is_some() || self.controlnet_single_layers.is_some() {
                    return Err(TrainError::Config(
                        "controlnet_layers and controlnet_single_layers make a ControlNet from the transformer; a ControlNet config sets its own".into(),
                    ));
                }
                FluxConfig::from_controlnet_json(c).map_err(whose("ControlNet"))?
            }
            None => {
                let (double, single) = DEFAULT_CONTROLNET_LAYERS;
                let layers = self.controlnet_layers.unwrap_or(double);
                let single = self.controlnet_single_layers.unwrap_or(single);
                (transformer.controlnet_from_transformer(layers, single)?, FluxControlNetExtras::default())
            }
        };
        transformer.check_controlnet(&controlnet)?;
        let side = self.latent_size.unwrap_or(DEFAULT_LATENT_SIZE);
        if side == 0 || !side.is_multiple_of(2) || side > super::super::sd3::MAX_CHANNELS * 16 {
            return Err(TrainError::Config(format!(
                "latent side {side}: Flux packs 2×2 latent patches, so it must be even (and at most {})",
                super::super::sd3::MAX_CHANNELS * 16
            )));
        }
        let guidance = match (transformer.guidance_embeds, self.guidance_scale) {
            (true, g) => Some(g.unwrap_or(DEFAULT_GUIDANCE_SCALE)),
            (false, None) => None,
            (false, Some(_)) => {
                return Err(TrainError::Config(
                    "guidance_scale is for a transformer with guidance_embeds (Flux-dev); this one has none".into(),
                ));
            }
        };
        if guidance.is_some_and(|g| !g.is_finite()) || !self.conditioning_scale.is_finite() {
            return Err(TrainError::Config("guidance_scale and conditioning_scale must be finite".into()));
        }
        match (extras.num_mode, self.control_mode) {
            (Some(n), Some(m)) if m < n => {}
            (Some(n), Some(m)) => {
                return Err(TrainError::Config(format!("control_mode {m}: the ControlNet has num_mode {n} (0..{n})")));
            }
            (Some(n), None) => {
                return Err(TrainError::Config(format!(
                    "the ControlNet is a union ControlNet (num_mode {n}): name the control_mode its samples are"
                )));
            }
            (None, Some(_)) => {
                return Err(TrainError::Config(
                    "control_mode is for a union ControlNet (num_mode); this one has none".into(),
                ));
            }
            (None, None) => {}
        }
        Ok(Resolved { transformer, controlnet, extras, side, guidance })
    }

    /// Checks the configs and that the hook names a block of this ControlNet.
    pub fn validate(&self, decoder: &DecoderConfig) -> Result<()> {
        let r = self.resolve()?;
        check_hook(&r.controlnet, decoder.hook_or(DEFAULT_HOOK))
    }

    /// The parameters of the transformer and of the ControlNet this spec trains (exact,
    /// [`FluxConfig::parameter_count`]).
    pub fn parameter_counts(&self) -> Result<(u128, u128)> {
        Ok(self.resolve()?.parameter_counts())
    }

    /// About how many bytes training this model takes with batches of `batch` and
    /// `text_tokens` T5 tokens, before anything is allocated: the frozen transformer in its
    /// storage type; the ControlNet's weights, gradients and two AdamW moments in f32 (and its
    /// EMA with `ema`); and per sample, [`ACTIVATIONS_PER_BLOCK`] token-by-width f32 tensors
    /// (image and text tokens) for every block of both networks the backward passes through
    /// (a floor, not a bound).
    pub fn training_bytes(&self, batch: usize, text_tokens: usize, ema: bool) -> Result<u128> {
        let r = self.resolve()?;
        let main_bytes = self.mixed_precision.dtype().size_bytes() as u128;
        let side_bytes = if ema { 20 } else { 16 };
        let (main, side) = r.parameter_counts();
        let params = main * main_bytes + side * side_bytes;
        let blocks = (r.transformer.num_layers
            + r.transformer.num_single_layers
            + r.controlnet.num_layers
            + r.controlnet.num_single_layers) as u128;
        let tokens = (r.side as u128 / 2).pow(2) + text_tokens as u128;
        let per_sample = blocks * ACTIVATIONS_PER_BLOCK * tokens * r.transformer.inner_dim() as u128 * 4;
        Ok(params + batch as u128 * per_sample)
    }
}

/// Token-by-width tensors per block and sample [`FluxSpec::training_bytes`] counts: the
/// flow transformers' floor (SD3's, [`crate::model::sd3::ACTIVATIONS_PER_BLOCK`]).
pub use crate::model::sd3::ACTIVATIONS_PER_BLOCK;

/// A hook must name one of the ControlNet's blocks.
fn check_hook(controlnet: &FluxConfig, hook: HookLayer) -> Result<()> {
    match hook {
        HookLayer::Block(i) if i < controlnet.num_layers => Ok(()),
        HookLayer::SingleBlock(i) if i < controlnet.num_single_layers => Ok(()),
        _ => Err(TrainError::Config(format!(
            "hook {hook} does not exist: this Flux ControlNet has block_0..block_{}{}",
            controlnet.num_layers - 1,
            match controlnet.num_single_layers {
                0 => String::new(),
                n => format!(" and single_block_0..single_block_{}", n - 1),
            }
        ))),
    }
}

/// The Flux dual-branch model.
pub struct FluxModel<B: Backend> {
    dual: DualParts<B>,
    transformer: FluxTransformer,
    controlnet: Option<FluxControlNet>,
    spec: FluxSpec,
    resolved: Resolved,
    /// The text tokens and the pooled text of every prompt.
    prompts: Option<(PromptTable, PromptTable)>,
    /// A ControlNet was loaded: loading the transformer afterwards must not copy over it.
    side_loaded: bool,
}

impl<B: Backend> FluxModel<B> {
    /// Builds the parts of `spec` with seeded initial weights; the ControlNet starts as a
    /// copy of the transformer's embeddings and first blocks (`from_transformer`).
    pub fn new(spec: &ModelSpec, parts: Parts, device: B::Device, seed: u64) -> Result<Self> {
        let mut flux = FluxSpec::from_spec(spec)?;
        let resolved = flux.resolve()?;
        check_hook(&resolved.controlnet, spec.decoder.hook_or(DEFAULT_HOOK))?;
        let mut store = DualParts::new_store(device, seed, parts);
        let transformer = FluxTransformer::new(&mut store, MAIN, &resolved.transformer)?;
        let (mut controlnet, mut decoder) = (None, None);
        if let Parts::Dual { decoder: with_decoder } = parts {
            controlnet = Some(FluxControlNet::new(&mut store, SIDE, &resolved.controlnet, resolved.extras)?);
            if with_decoder {
                // Each hooked token stands for a 2×2 patch of the latents' channels.
                let c = &resolved.transformer;
                let out = (2, c.out_channels / 4);
                decoder = Some(LisaDecoder::for_tokens(&mut store, DECODER, &spec.decoder, c.inner_dim(), out)?);
            }
        }
        let prompts = read_prompts(&mut flux, &resolved.transformer)?;
        let dual = DualParts { store, parts, decoder, decoder_config: spec.decoder.resolved(DEFAULT_HOOK) };
        let mut model = Self { dual, transformer, controlnet, spec: flux, resolved, prompts, side_loaded: false };
        model.copy_main_into_side()?;
        model.dual.cast_main(model.spec.mixed_precision.dtype())?;
        Ok(model)
    }

    /// Reads the prompts' precomputed text tokens (`text`) and pooled text (`pooled`); the
    /// model's spec then records them by their digests.
    pub fn read_text_embeddings(&mut self, text: &Path, pooled: &Path) -> Result<()> {
        let mut spec = self.spec.clone();
        spec.text_embeddings = Some(text.to_path_buf());
        spec.pooled_text_embeddings = Some(pooled.to_path_buf());
        spec.text_embeddings_sha256 = None;
        spec.pooled_text_embeddings_sha256 = None;
        self.prompts = read_prompts(&mut spec, &self.resolved.transformer)?;
        self.spec = spec;
        Ok(())
    }

    /// The transformer's settings.
    pub fn transformer_config(&self) -> &FluxConfig {
        &self.resolved.transformer
    }

    /// The ControlNet's settings.
    pub fn controlnet_config(&self) -> (&FluxConfig, FluxControlNetExtras) {
        (&self.resolved.controlnet, self.resolved.extras)
    }

    /// The ControlNet (None: built as the prior alone).
    fn controlnet(&self) -> Result<&FluxControlNet> {
        self.controlnet.as_ref().ok_or_else(|| TrainError::Config("this model was built without the ControlNet".into()))
    }

    /// `from_transformer`: the ControlNet's embeddings and blocks ← the transformer's.
    fn copy_main_into_side(&mut self) -> Result<()> {
        if self.controlnet.is_some() {
            copy_transformer_into_controlnet(&mut self.dual.store, MAIN, SIDE)?;
        }
        Ok(())
    }

    /// The text tokens `[n, s, joint_attention_dim]` and pooled text `[n, pooled]` of `cond`.
    fn text(&self, cond: &Conditioning, device: &B::Device) -> Result<(B::Tensor, B::Tensor)> {
        let c = &self.resolved.transformer;
        pooled_text_tensors::<B>(cond, (c.joint_attention_dim, c.pooled_projection_dim), device, NAME)
    }

    /// Runs `f` with the pass's [`FluxInputs`] (text as constants of the tape; the guidance
    /// scale, ×1000 as diffusers passes it, for every sample).
    fn with_inputs<T>(
        &self,
        p: &Bound<'_, B>,
        device: &B::Device,
        cond: &Conditioning,
        f: impl FnOnce(&FluxInputs<'_, B>) -> Result<T>,
    ) -> Result<T> {
        let (context, pooled) = self.text(cond, device)?;
        let (context, pooled) = (p.tape.constant(context), p.tape.constant(pooled));
        let guidance: Option<Vec<f32>> = self.resolved.guidance.map(|g| vec![g * 1000.0; cond.t.len()]);
        f(&FluxInputs { context: &context, pooled: &pooled, t: &cond.t, guidance: guidance.as_deref() })
    }

    /// Loads a diffusers Flux ControlNet folder (or weights file) into `side.*`, to continue
    /// training it. Every tensor must be there, with the model's shapes.
    pub fn load_controlnet(&mut self, path: &Path) -> Result<usize> {
        self.controlnet()?;
        let n = load_weights(&mut self.dual.store, SIDE, path)?;
        self.side_loaded = true;
        Ok(n)
    }

    /// Writes the ControlNet as a diffusers folder that `FluxControlNetModel.from_pretrained`
    /// loads (`config.json` and `diffusion_pytorch_model.safetensors`, each atomically).
    pub fn save_controlnet(&self, dir: &Path) -> Result<()> {
        self.controlnet()?;
        let at = Scope::from(SIDE);
        let prefix = format!("{}.", at.path());
        let weights: Vec<(String, &B::Tensor)> = self
            .dual
            .store
            .iter()
            .filter_map(|(_, p)| p.name.strip_prefix(prefix.as_str()).map(|n| (n.to_string(), &p.value)))
            .collect();
        let config = self.resolved.controlnet.controlnet_json(self.resolved.extras);
        write_diffusers_folder::<B>(&weights, &config, dir)
    }
}

/// Reads the spec's two prompt tables (both or neither), checks them against their recorded
/// digests and records the digests.
fn read_prompts(spec: &mut FluxSpec, c: &FluxConfig) -> Result<Option<(PromptTable, PromptTable)>> {
    read_prompt_pair(
        (&spec.text_embeddings, &spec.pooled_text_embeddings),
        (c.joint_attention_dim, c.pooled_projection_dim),
        (&mut spec.text_embeddings_sha256, &mut spec.pooled_text_embeddings_sha256),
        NAME,
    )
}

/// Image tokens `[b, g·g, d]` → the grid `(g, g)` (lisa's Flux trains square latents).
fn square_grid<B: Backend>(tokens: &Var<B>) -> Result<(usize, usize)> {
    let n = B::shape(&tokens.value).dims().get(1).copied().unwrap_or(0);
    let g = (n as f64).sqrt().round() as usize;
    if g == 0 || g * g != n {
        return Err(TrainError::Mismatch(format!("{n} image tokens are not a square grid")));
    }
    Ok((g, g))
}

impl<B: Backend> DualDenoiser<B> for FluxModel<B> {
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
        let side = self.resolved.side;
        [self.resolved.transformer.out_channels / 4, side, side]
    }

    /// The ControlNet reads the VAE-encoded condition: latents of the sample's shape.
    fn hint_channels(&self) -> usize {
        self.resolved.controlnet.in_channels / 4
    }

    fn latent_space(&self) -> bool {
        true
    }

    fn latent_hints(&self) -> bool {
        true
    }

    fn prediction(&self) -> Prediction {
        Prediction::FlowVelocity
    }

    fn conditioning_scale(&self) -> f32 {
        self.spec.conditioning_scale
    }

    /// The prompts' precomputed text tokens and pooled text.
    fn embed_prompts(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        lookup_pooled_text(self.prompts.as_ref(), prompts, NAME)
    }

    fn check_prompts(&self, prompts: &[&str]) -> Result<()> {
        check_pooled_text(self.prompts.as_ref(), prompts, NAME)
    }

    /// The transformer's embeddings: `skips.mid` = the image tokens entering the first block,
    /// `temb` = `silu(temb)`, `context` = the projected text tokens.
    fn encode_main(&self, p: &Bound<'_, B>, x_t: &Var<B>, cond: &Conditioning) -> Result<MainEncoding<B>> {
        let Embedded { tokens, silu_temb, context, .. } =
            self.with_inputs(p, &B::device(&x_t.value), cond, |inputs| self.transformer.embed(p, x_t, inputs))?;
        Ok(MainEncoding {
            temb: silu_temb,
            context: Some(context),
            skips: Skips { down: Vec::new(), mid: Some(tokens), single: Vec::new() },
        })
    }

    fn decode_main(
        &self,
        p: &Bound<'_, B>,
        enc: &MainEncoding<B>,
        residuals: Option<(&Residuals<B>, f32)>,
    ) -> Result<Var<B>> {
        let tokens = enc.skips.mid()?.clone();
        let grid = square_grid(&tokens)?;
        let embedded = Embedded {
            tokens,
            silu_temb: enc.temb.clone(),
            context: enc.context.clone().ok_or(TrainError::Internal("a flux encoding carries the text tokens"))?,
            grid,
        };
        let scaled = |list: &[Var<B>], scale: f32| -> Result<Vec<Var<B>>> {
            list.iter().map(|v| if scale == 1.0 { Ok(v.clone()) } else { p.tape.scale(v, scale) }).collect()
        };
        let residuals = match residuals {
            None => None,
            Some((r, scale)) => {
                Some(FluxResiduals { blocks: scaled(&r.down, scale)?, single: scaled(&r.single, scale)? })
            }
        };
        self.transformer.decode(p, embedded, residuals.as_ref())
    }

    fn side(&self, p: &Bound<'_, B>, x_t: &Var<B>, hint: &Var<B>, cond: &Conditioning) -> Result<SideOutput<B>> {
        let controlnet = self.controlnet()?;
        let mode: Option<Vec<usize>> = self.spec.control_mode.map(|m| vec![m; cond.t.len()]);
        let out = self.with_inputs(p, &B::device(&x_t.value), cond, |inputs| {
            controlnet.forward(p, x_t, hint, inputs, mode.as_deref(), 1.0)
        })?;
        Ok(SideOutput {
            residuals: Skips::blocks(out.residuals.blocks, out.residuals.single),
            features: Skips::blocks(out.hidden, out.single_hidden),
        })
    }

    /// Reads a diffusers Flux transformer folder (single file or sharded) into `main.*`, then
    /// initialises the ControlNet from it unless a ControlNet was loaded already.
    fn load_main(&mut self, path: &Path) -> Result<usize> {
        let n = load_weights(&mut self.dual.store, MAIN, path)?;
        if !self.side_loaded {
            self.copy_main_into_side()?;
        }
        self.dual.cast_main(self.spec.mixed_precision.dtype())?;
        Ok(n)
    }

    fn load_side(&mut self, path: &Path) -> Result<usize> {
        self.load_controlnet(path)
    }

    fn export_side(&self, dir: &Path) -> Result<bool> {
        self.save_controlnet(dir).map(|()| true)
    }
}
