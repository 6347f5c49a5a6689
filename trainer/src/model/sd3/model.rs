//! The `sd3` architecture: diffusers' `SD3Transformer2DModel` as the frozen main network of a
//! flow-matching model, `SD3ControlNetModel` as the side network, and the LISA decoder hooked
//! at the input of a ControlNet's `controlnet_blocks[i]` (`block_i`), decoding the hooked image
//! tokens back to latent patches.
//!
//! Parameter names: `main.<transformer name>`, `side.<ControlNet name>`, `lisa.*`.
//! The main encoding is the transformer's embeddings (patch tokens with positions, the
//! timestep + pooled-text modulation input, the projected text tokens): the prior pass of
//! LISA reuses them and runs the blocks again without residuals.

use std::path::{Path, PathBuf};

use lisa_core::Prediction;
use lisa_core::backend::{Backend, DType, Shape};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    Embedded, Sd3Config, Sd3ControlNet, Sd3ControlNetExtras, Sd3Inputs, Sd3Transformer,
    copy_transformer_into_controlnet, load_weights, save_controlnet,
};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::sd::{MixedPrecision, PromptTable};
use crate::model::{
    Conditioning, DECODER, DecoderConfig, DualDenoiser, DualParts, HookLayer, LisaDecoder, MAIN, MainEncoding,
    ModelSpec, Parts, PromptEmbedding, Residuals, SIDE, SideOutput, Skips,
};
use crate::params::Bound;

/// The registry name.
pub const NAME: &str = "sd3";
/// The side layer the LISA decoder reads when the run file names none: the first ControlNet
/// block, the one every SD3 ControlNet has.
pub const DEFAULT_HOOK: HookLayer = HookLayer::Block(0);
/// Blocks of a ControlNet made from the transformer when the spec names none (diffusers'
/// `SD3ControlNetModel.from_transformer` default, which train_controlnet_sd3.py keeps).
pub const DEFAULT_CONTROLNET_LAYERS: usize = 12;

/// The `[model]` keys of the sd3 architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sd3Spec {
    /// The transformer's diffusers `config.json`, as read.
    pub transformer: Map<String, Value>,
    /// The ControlNet's diffusers `config.json` (None: `from_transformer` with
    /// `controlnet_layers` blocks and `extra_conditioning_channels`).
    #[serde(default)]
    pub controlnet: Option<Map<String, Value>>,
    /// Blocks of a ControlNet made from the transformer (None: diffusers' 12).
    #[serde(default)]
    pub controlnet_layers: Option<usize>,
    /// Condition-latent channels beyond the latents' of a ControlNet made from the
    /// transformer (train_controlnet_sd3.py's `--num_extra_conditioning_channels`, 0).
    #[serde(default)]
    pub extra_conditioning_channels: usize,
    /// The residual multiplier during training (1).
    #[serde(default = "one")]
    pub conditioning_scale: f32,
    /// The prompts' precomputed text tokens (a safetensors file, one `[tokens,
    /// joint_attention_dim]` tensor per prompt, named by the prompt; `""` the null prompt):
    /// SD3's `prompt_embeds`, CLIP and T5 joined.
    #[serde(default)]
    pub text_embeddings: Option<PathBuf>,
    /// The SHA-256 of `text_embeddings`, filled in when read, checked when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_embeddings_sha256: Option<String>,
    /// The prompts' pooled projections (one `[1, pooled_projection_dim]` tensor per prompt,
    /// the same names): SD3's `pooled_prompt_embeds`.
    #[serde(default)]
    pub pooled_text_embeddings: Option<PathBuf>,
    /// The SHA-256 of `pooled_text_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooled_text_embeddings_sha256: Option<String>,
    /// The latent side trained at, when not the transformer's `sample_size`.
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
    transformer: Sd3Config,
    controlnet: Sd3Config,
    extras: Sd3ControlNetExtras,
    /// Patches per side of the trained latents.
    grid: usize,
}

impl Sd3Spec {
    /// Reads the architecture keys of `spec`.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        serde_json::from_value(Value::Object(spec.config.clone()))
            .map_err(|e| TrainError::Config(format!("[model] of the sd3 architecture: {e}")))
    }

    /// This configuration as a [`ModelSpec`].
    pub fn to_spec(&self, decoder: &DecoderConfig) -> ModelSpec {
        let config = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Default::default(),
        };
        ModelSpec { architecture: NAME.to_string(), decoder: decoder.clone(), config }
    }

    /// [`ModelSpec::identity`]'s part for sd3: embedding paths go where their digests pin
    /// their contents, and `_name_or_path` goes from both configs.
    pub fn remove_locations(config: &mut Map<String, Value>) {
        for key in ["text_embeddings", "pooled_text_embeddings"] {
            if config.get(&format!("{key}_sha256")).is_some_and(Value::is_string) {
                config.remove(key);
            }
        }
        for part in ["transformer", "controlnet"] {
            if let Some(Value::Object(c)) = config.get_mut(part) {
                c.remove("_name_or_path");
            }
        }
    }

    fn resolve(&self) -> Result<Resolved> {
        let whose = |part: &'static str| {
            move |e: TrainError| match e {
                TrainError::Config(m) => TrainError::Config(format!("the {part}'s {m}")),
                other => other,
            }
        };
        let transformer = Sd3Config::from_transformer_json(&self.transformer).map_err(whose("transformer"))?;
        let (controlnet, extras) = match &self.controlnet {
            Some(c) => {
                if self.controlnet_layers.is_some() || self.extra_conditioning_channels != 0 {
                    return Err(TrainError::Config(
                        "controlnet_layers and extra_conditioning_channels make a ControlNet from the transformer; a ControlNet config sets its own".into(),
                    ));
                }
                Sd3Config::from_controlnet_json(c).map_err(whose("ControlNet"))?
            }
            None => {
                let layers = self.controlnet_layers.unwrap_or(DEFAULT_CONTROLNET_LAYERS);
                let extras = Sd3ControlNetExtras {
                    extra_conditioning_channels: self.extra_conditioning_channels,
                    force_zeros_for_pooled_projection: true,
                };
                if transformer.in_channels + extras.extra_conditioning_channels > super::MAX_CHANNELS {
                    return Err(TrainError::Config(format!(
                        "extra_conditioning_channels {} beyond lisa's limit of {} channels",
                        extras.extra_conditioning_channels,
                        super::MAX_CHANNELS
                    )));
                }
                (transformer.controlnet_from_transformer(layers)?, extras)
            }
        };
        transformer.check_controlnet(&controlnet)?;
        let grid = transformer.grid(self.latent_size.unwrap_or(transformer.sample_size))?;
        if !self.conditioning_scale.is_finite() {
            return Err(TrainError::Config("conditioning_scale must be finite".into()));
        }
        Ok(Resolved { transformer, controlnet, extras, grid })
    }

    /// Checks the configs and that the hook names a block of this ControlNet.
    pub fn validate(&self, decoder: &DecoderConfig) -> Result<()> {
        let r = self.resolve()?;
        check_hook(&r.controlnet, decoder.hook_or(DEFAULT_HOOK))
    }

    /// The numbers in the weights of the transformer and of the ControlNet this spec trains
    /// (exact, [`Sd3Config::parameter_count`]).
    pub fn parameter_counts(&self) -> Result<(u128, u128)> {
        let r = self.resolve()?;
        Ok((r.transformer.parameter_count(None), r.controlnet.parameter_count(Some(r.extras))))
    }

    /// About how many bytes training this model takes with batches of `batch` and
    /// `text_tokens` text tokens (77 CLIP + T5's), before anything is allocated: the frozen
    /// transformer in its storage type; the ControlNet's weights, gradients and two AdamW
    /// moments in f32 (and its EMA with `ema`); and per sample,
    /// [`ACTIVATIONS_PER_BLOCK`] token-by-width f32 tensors (image and text
    /// tokens) for every block of both networks the backward passes through (a floor, not a
    /// bound), as for Flux.
    pub fn training_bytes(&self, batch: usize, text_tokens: usize, ema: bool) -> Result<u128> {
        let r = self.resolve()?;
        let main_bytes = self.mixed_precision.dtype().size_bytes() as u128;
        let side_bytes = if ema { 20 } else { 16 };
        let (main, side) = self.parameter_counts()?;
        let params = main * main_bytes + side * side_bytes;
        let blocks = (r.transformer.num_layers + r.controlnet.num_layers) as u128;
        let tokens = (r.grid as u128).pow(2) + text_tokens as u128;
        let per_sample = blocks * ACTIVATIONS_PER_BLOCK * tokens * r.transformer.inner_dim() as u128 * 4;
        Ok(params + batch as u128 * per_sample)
    }
}

/// Token-by-width tensors per block and sample the flow transformers' memory checks count
/// ([`Sd3Spec::training_bytes`], Flux's): a block keeps more (its normed inputs, q, k, v,
/// attention output and MLP hidden), so the count is a floor.
pub const ACTIVATIONS_PER_BLOCK: u128 = 4;

/// A hook must name one of the ControlNet's blocks.
fn check_hook(controlnet: &Sd3Config, hook: HookLayer) -> Result<()> {
    match hook {
        HookLayer::Block(i) if i < controlnet.num_layers => Ok(()),
        _ => Err(TrainError::Config(format!(
            "hook {hook} does not exist: this SD3 ControlNet has block_0..block_{}",
            controlnet.num_layers - 1
        ))),
    }
}

/// The SD3 dual-branch model.
pub struct Sd3Model<B: Backend> {
    dual: DualParts<B>,
    transformer: Sd3Transformer,
    controlnet: Option<Sd3ControlNet>,
    spec: Sd3Spec,
    resolved: Resolved,
    /// The text tokens and the pooled projections of every prompt.
    prompts: Option<(PromptTable, PromptTable)>,
    /// A ControlNet was loaded: loading the transformer afterwards must not copy over it.
    side_loaded: bool,
}

impl<B: Backend> Sd3Model<B> {
    /// Builds the parts of `spec` with seeded initial weights; the ControlNet starts as a
    /// copy of the transformer's embeddings and first blocks (`from_transformer`).
    pub fn new(spec: &ModelSpec, parts: Parts, device: B::Device, seed: u64) -> Result<Self> {
        let mut sd3 = Sd3Spec::from_spec(spec)?;
        let resolved = sd3.resolve()?;
        let hook = spec.decoder.hook_or(DEFAULT_HOOK);
        check_hook(&resolved.controlnet, hook)?;
        let mut store = DualParts::new_store(device, seed, parts);
        let transformer = Sd3Transformer::new(&mut store, MAIN, &resolved.transformer)?;
        let (mut controlnet, mut decoder) = (None, None);
        if let Parts::Dual { decoder: with_decoder } = parts {
            controlnet = Some(Sd3ControlNet::new(&mut store, SIDE, &resolved.controlnet, resolved.extras)?);
            if with_decoder {
                let c = &resolved.transformer;
                let out = (c.patch_size, c.out_channels);
                decoder = Some(LisaDecoder::for_tokens(&mut store, DECODER, &spec.decoder, c.inner_dim(), out)?);
            }
        }
        let prompts = read_prompts(&mut sd3, &resolved.transformer)?;
        let dual = DualParts { store, parts, decoder, decoder_config: spec.decoder.resolved(DEFAULT_HOOK) };
        let mut model = Self { dual, transformer, controlnet, spec: sd3, resolved, prompts, side_loaded: false };
        model.copy_main_into_side()?;
        model.dual.cast_main(model.spec.mixed_precision.dtype())?;
        Ok(model)
    }

    /// Reads the prompts' precomputed text tokens (`text`) and pooled projections (`pooled`);
    /// the model's spec then records them by their digests.
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
    pub fn transformer_config(&self) -> &Sd3Config {
        &self.resolved.transformer
    }

    /// The ControlNet's settings.
    pub fn controlnet_config(&self) -> (&Sd3Config, Sd3ControlNetExtras) {
        (&self.resolved.controlnet, self.resolved.extras)
    }

    /// The ControlNet (None: built as the prior alone).
    fn controlnet(&self) -> Result<&Sd3ControlNet> {
        self.controlnet.as_ref().ok_or_else(|| TrainError::Config("this model was built without the ControlNet".into()))
    }

    /// `from_transformer`: the ControlNet's embeddings and blocks ← the transformer's.
    fn copy_main_into_side(&mut self) -> Result<()> {
        if self.controlnet.is_some() {
            copy_transformer_into_controlnet(&mut self.dual.store, MAIN, SIDE)?;
        }
        Ok(())
    }

    /// The text tokens `[n, s, joint_attention_dim]` and pooled projections `[n, pooled]` of
    /// `cond`.
    fn text(&self, cond: &Conditioning, device: &B::Device) -> Result<(B::Tensor, B::Tensor)> {
        let c = &self.resolved.transformer;
        pooled_text_tensors::<B>(cond, (c.joint_attention_dim, c.pooled_projection_dim), device, NAME)
    }

    /// Runs `f` with the pass's [`Sd3Inputs`] (text as constants of the tape).
    fn with_inputs<T>(
        &self,
        p: &Bound<'_, B>,
        device: &B::Device,
        cond: &Conditioning,
        f: impl FnOnce(&Sd3Inputs<'_, B>) -> Result<T>,
    ) -> Result<T> {
        let (context, pooled) = self.text(cond, device)?;
        let (context, pooled) = (p.tape.constant(context), p.tape.constant(pooled));
        f(&Sd3Inputs { context: &context, pooled: &pooled, t: &cond.t })
    }

    /// Loads a diffusers SD3 ControlNet folder (or weights file) into `side.*`, to continue
    /// training it. Every tensor must be there, with the model's shapes.
    pub fn load_controlnet(&mut self, path: &Path) -> Result<usize> {
        self.controlnet()?;
        let positions = self.transformer.positions().to_vec();
        let n = load_weights(&mut self.dual.store, SIDE, path, &positions)?;
        self.side_loaded = true;
        Ok(n)
    }

    /// Writes the ControlNet as a diffusers folder that `SD3ControlNetModel.from_pretrained`
    /// loads.
    pub fn save_controlnet(&self, dir: &Path) -> Result<()> {
        self.controlnet()?;
        save_controlnet(&self.dual.store, SIDE, &self.resolved.controlnet, self.resolved.extras, dir)
    }
}

/// Reads the spec's two prompt tables (both or neither), checks them against their recorded
/// digests and records the digests.
fn read_prompts(spec: &mut Sd3Spec, c: &Sd3Config) -> Result<Option<(PromptTable, PromptTable)>> {
    read_prompt_pair(
        (&spec.text_embeddings, &spec.pooled_text_embeddings),
        (c.joint_attention_dim, c.pooled_projection_dim),
        (&mut spec.text_embeddings_sha256, &mut spec.pooled_text_embeddings_sha256),
        NAME,
    )
}

/// The text tokens `[n, s, text_dim]` and pooled text `[n, pooled_dim]` of `cond`
/// (`PromptEmbedding::TextPooled`) as tensors on `device`, for a flow transformer that reads
/// those widths; other widths or kinds are errors naming `architecture`.
pub(crate) fn pooled_text_tensors<B: Backend>(
    cond: &Conditioning,
    (text_dim, pooled_dim): (usize, usize),
    device: &B::Device,
    architecture: &str,
) -> Result<(B::Tensor, B::Tensor)> {
    let n = cond.t.len();
    match &cond.prompt {
        PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim: pd }
            if *dim == text_dim && *pd == pooled_dim && values.len() == n * tokens * dim && pooled.len() == n * pd =>
        {
            Ok((
                B::from_slice(values, &Shape::new([n, *tokens, *dim]), DType::F32, device)?,
                B::from_slice(pooled, &Shape::new([n, *pd]), DType::F32, device)?,
            ))
        }
        PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim: pd } => {
            Err(TrainError::Mismatch(format!(
                "text of {} values as [{n}, {tokens}, {dim}] and pooled projections of {} as [{n}, {pd}]: the transformer reads [{n}, tokens, {text_dim}] and [{n}, {pooled_dim}]",
                values.len(),
                pooled.len(),
            )))
        }
        _ => Err(TrainError::Mismatch(format!(
            "the {architecture} model reads text tokens with pooled projections (PromptEmbedding::TextPooled)"
        ))),
    }
}

/// The text tokens and pooled text of `prompts` from a flow transformer's two tables
/// (None: the model was given none, an error naming `architecture`).
pub(crate) fn lookup_pooled_text(
    tables: Option<&(PromptTable, PromptTable)>,
    prompts: &[&str],
    architecture: &str,
) -> Result<PromptEmbedding> {
    let (text, pooled) = tables.ok_or_else(|| no_text_tables(architecture))?;
    Ok(PromptEmbedding::TextPooled {
        values: text.lookup(prompts)?,
        tokens: text.tokens,
        dim: text.dim,
        pooled: pooled.lookup(prompts)?,
        pooled_dim: pooled.dim,
    })
}

/// Checks that a flow transformer's two tables name every one of `prompts` (the error
/// [`lookup_pooled_text`] would give), reading no embedding.
pub(crate) fn check_pooled_text(
    tables: Option<&(PromptTable, PromptTable)>,
    prompts: &[&str],
    architecture: &str,
) -> Result<()> {
    let (text, pooled) = tables.ok_or_else(|| no_text_tables(architecture))?;
    text.check(prompts)?;
    pooled.check(prompts)
}

fn no_text_tables(architecture: &str) -> TrainError {
    TrainError::Config(format!(
        "the {architecture} model reads precomputed text embeddings (text_embeddings and pooled_text_embeddings, safetensors files of one tensor per prompt); none were given"
    ))
}

/// The text-token and pooled-text tables of a flow transformer's spec (`paths`, both or
/// neither; rows `widths` wide), checked against their recorded digests (`digests`), which
/// are filled in when absent. `architecture` names the model in errors.
pub(crate) fn read_prompt_pair(
    paths: (&Option<PathBuf>, &Option<PathBuf>),
    (text_dim, pooled_dim): (usize, usize),
    digests: (&mut Option<String>, &mut Option<String>),
    architecture: &str,
) -> Result<Option<(PromptTable, PromptTable)>> {
    let (text, pooled) = match paths {
        (None, None) => return Ok(None),
        (Some(text), Some(pooled)) => (PromptTable::read(text, text_dim)?, PromptTable::read(pooled, pooled_dim)?),
        _ => {
            return Err(TrainError::Config(format!(
                "the {architecture} model reads text_embeddings and pooled_text_embeddings together; only one was given"
            )));
        }
    };
    if pooled.tokens != 1 {
        return Err(crate::weights::bad(
            &pooled.path,
            format!("holds [{}, {}] tensors; pooled projections are [1, {}]", pooled.tokens, pooled.dim, pooled.dim),
        ));
    }
    text.pin(digests.0)?;
    pooled.pin(digests.1)?;
    Ok(Some((text, pooled)))
}

impl<B: Backend> DualDenoiser<B> for Sd3Model<B> {
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
        let c = &self.resolved.transformer;
        let side = self.resolved.grid * c.patch_size;
        [c.out_channels, side, side]
    }

    /// The ControlNet reads the VAE-encoded condition: latents of the sample's side with
    /// `in_channels + extra_conditioning_channels` channels.
    fn hint_channels(&self) -> usize {
        self.resolved.controlnet.in_channels + self.resolved.extras.extra_conditioning_channels
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

    /// The prompts' precomputed text tokens and pooled projections.
    fn embed_prompts(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        lookup_pooled_text(self.prompts.as_ref(), prompts, NAME)
    }

    fn check_prompts(&self, prompts: &[&str]) -> Result<()> {
        check_pooled_text(self.prompts.as_ref(), prompts, NAME)
    }

    /// The transformer's embeddings: `skips.mid` = the patch tokens entering the first block,
    /// `temb` = `silu(temb)`, `context` = the projected text tokens.
    fn encode_main(&self, p: &Bound<'_, B>, x_t: &Var<B>, cond: &Conditioning) -> Result<MainEncoding<B>> {
        let Embedded { tokens, silu_temb, context } =
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
        let embedded = Embedded {
            tokens: enc.skips.mid()?.clone(),
            silu_temb: enc.temb.clone(),
            context: enc.context.clone().ok_or(TrainError::Internal("an sd3 encoding carries the text tokens"))?,
        };
        let scaled = match residuals {
            None => None,
            Some((r, scale)) => Some(
                r.down
                    .iter()
                    .map(|v| if scale == 1.0 { Ok(v.clone()) } else { p.tape.scale(v, scale) })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        self.transformer.decode(p, embedded, scaled.as_deref())
    }

    fn side(&self, p: &Bound<'_, B>, x_t: &Var<B>, hint: &Var<B>, cond: &Conditioning) -> Result<SideOutput<B>> {
        let controlnet = self.controlnet()?;
        let out =
            self.with_inputs(p, &B::device(&x_t.value), cond, |inputs| controlnet.forward(p, x_t, hint, inputs, 1.0))?;
        Ok(SideOutput {
            residuals: Skips::blocks(out.residuals, Vec::new()),
            features: Skips::blocks(out.hidden, Vec::new()),
        })
    }

    /// Reads a diffusers SD3 transformer folder (single file or sharded) into `main.*`, then
    /// initialises the ControlNet from it unless a ControlNet was loaded already.
    fn load_main(&mut self, path: &Path) -> Result<usize> {
        let positions = self.transformer.positions().to_vec();
        let n = load_weights(&mut self.dual.store, MAIN, path, &positions)?;
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
