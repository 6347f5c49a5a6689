//! The diffusers `config.json` of `UNet2DConditionModel` and `ControlNetModel` (SD 1.x/2.x):
//! the keys `lisa` builds from, the keys it accepts only at their default, and nothing else.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{Result, TrainError};

/// A down block of the UNet's encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// Resnets, each followed by a spatial transformer; a downsampler unless last.
    CrossAttnDownBlock2D,
    /// Resnets only; a downsampler unless last.
    DownBlock2D,
}

/// An up block of the UNet's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// Resnets over the concatenated skip, each followed by a spatial transformer.
    CrossAttnUpBlock2D,
    /// Resnets over the concatenated skip.
    UpBlock2D,
}

/// An int for every block, or one per block (`attention_head_dim`, `num_attention_heads`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same for every block.
    All(usize),
    /// One per down block.
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::All(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => {
                Err(TrainError::Config(format!("config.json: {key} has {} entries for {blocks} blocks", v.len())))
            }
        }
    }
}

/// The settings a UNet and its ControlNet share (diffusers' names and meanings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in (4).
    pub in_channels: usize,
    /// Predicted channels (4).
    pub out_channels: usize,
    /// Latent side the model was trained at (64 for 512 px).
    pub sample_size: usize,
    /// Cosine half first in the timestep embedding (true for SD).
    pub flip_sin_to_cos: bool,
    /// `s` in the frequencies `exp(−ln(10⁴)·i/(half − s))` (0 for SD).
    pub freq_shift: usize,
    /// The encoder's blocks.
    pub down_block_types: Vec<DownBlockType>,
    /// The decoder's blocks.
    pub up_block_types: Vec<UpBlockType>,
    /// Channels per level (`[320, 640, 1280, 1280]` for SD).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Attention heads per block, resolved from `num_attention_heads` or, as diffusers does,
    /// from `attention_head_dim` (which diffusers reads as the head count).
    pub heads: Vec<usize>,
    /// Width of the text embeddings (768 for SD 1.x, 1024 for SD 2.x).
    pub cross_attention_dim: usize,
    /// `proj_in`/`proj_out` as linear layers (SD 2.x) instead of 1×1 convs (SD 1.x).
    pub use_linear_projection: bool,
    /// Groups of every group norm (32).
    pub norm_num_groups: usize,
    /// ε of the resnets' and the output's group norms (1e-5).
    pub norm_eps: f32,
    /// Scores and softmax in f32 (always done here, whatever the flag).
    pub upcast_attention: bool,
    /// Transformer blocks in each spatial transformer of each down block (diffusers'
    /// `transformer_layers_per_block`: 1 for SD, `[1, 2, 10]` for SDXL); the middle block takes
    /// the last level's, the up blocks the down blocks' in reverse.
    #[serde(default)]
    pub transformer_layers: Vec<usize>,
    /// SDXL's `addition_embed_type = "text_time"` (None: no added embedding, SD 1.x/2.x).
    #[serde(default)]
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`): the pooled text embedding
/// and the sinusoids of six micro-conditioning ids (original height and width, crop top and
/// left, target height and width), through `add_embedding`, added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextTimeConfig {
    /// Sinusoid width per id (`addition_time_embed_dim`, 256 for SDXL).
    pub time_embed_dim: usize,
    /// `add_embedding`'s input width (`projection_class_embeddings_input_dim`, 2816 for SDXL):
    /// the pooled text's width plus `6 · time_embed_dim`.
    pub input_dim: usize,
}

/// The micro-conditioning ids per sample (`add_time_ids`).
pub const TIME_IDS: usize = 6;

impl TextTimeConfig {
    /// The pooled text embedding's width (`input_dim − 6 · time_embed_dim`, 1280 for SDXL).
    pub fn pooled_dim(&self) -> usize {
        self.input_dim - TIME_IDS * self.time_embed_dim
    }
}

/// The most channels of any block, and the widest cross-attention (SD 2.x: 1280 and 1024).
pub const MAX_WIDTH: usize = 1 << 14;
/// The most down blocks (SD: 4).
pub const MAX_LEVELS: usize = 8;
/// The most resnets per block (SD: 2).
pub const MAX_LAYERS_PER_BLOCK: usize = 16;
/// The most transformer blocks per spatial transformer (SDXL: 10).
pub const MAX_TRANSFORMER_LAYERS: usize = 64;
/// The most latent or condition channels (SD: 4; inpainting: 9).
pub const MAX_IO_CHANNELS: usize = 1 << 10;
/// The largest `sample_size` (SD 2.x: 96).
pub const MAX_SAMPLE_SIZE: usize = 1 << 12;

/// The parameter counts [`UNetConfig::parameter_estimate`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterEstimate {
    /// The UNet.
    pub unet: u128,
    /// A ControlNet with the UNet's encoder.
    pub controlnet: u128,
}

/// What a ControlNet adds to the shared settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetExtras {
    /// Channels of the condition image (3).
    pub conditioning_channels: usize,
    /// Channels of the condition embedding's stages (`[16, 32, 96, 256]`).
    pub conditioning_embedding_out_channels: Vec<usize>,
}

/// Keys accepted only at their default value: `(key, default)`. `null` defaults also accept
/// the key's absence.
const AT_DEFAULT: &[(&str, &str)] = &[
    ("center_input_sample", "false"),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("only_cross_attention", "false"),
    ("downsample_padding", "1"),
    ("mid_block_scale_factor", "1"),
    ("act_fn", "\"silu\""),
    ("reverse_transformer_layers_per_block", "null"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("dual_cross_attention", "false"),
    ("class_embed_type", "null"),
    ("num_class_embeds", "null"),
    ("resnet_time_scale_shift", "\"default\""),
    ("resnet_skip_time_act", "false"),
    ("resnet_out_scale_factor", "1"),
    ("time_embedding_type", "\"positional\""),
    ("time_embedding_dim", "null"),
    ("time_embedding_act_fn", "null"),
    ("timestep_post_act", "null"),
    ("time_cond_proj_dim", "null"),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("attention_type", "\"default\""),
    ("class_embeddings_concat", "false"),
    ("mid_block_only_cross_attention", "null"),
    ("cross_attention_norm", "null"),
    ("addition_embed_type_num_heads", "64"),
    ("dropout", "0"),
    ("controlnet_conditioning_channel_order", "\"rgb\""),
    ("global_pool_conditions", "false"),
];

/// Whether `a` and `b` are the same JSON value, numbers compared as numbers (`1` = `1.0`).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The supported keys, which [`parse`] reads.
const UNET_KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "sample_size",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "use_linear_projection",
    "norm_num_groups",
    "norm_eps",
    "upcast_attention",
    "transformer_layers_per_block",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
];

/// ControlNet-only supported keys.
const CONTROLNET_KEYS: &[&str] = &["conditioning_channels", "conditioning_embedding_out_channels"];

/// `config[key]` deserialised, or `default` when absent or null; errors name the key.
pub(crate) fn get<T: serde::de::DeserializeOwned>(config: &Map<String, Value>, key: &str, default: Value) -> Result<T> {
    let v = config.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default);
    serde_json::from_value(v.clone()).map_err(|e| TrainError::Config(format!("config.json: {key} = {v}: {e}")))
}

/// Rejects every key that is neither supported nor at its default in `at_default`
/// (`(key, default as JSON)`; `_`-prefixed metadata keys such as `_class_name` are ignored).
pub(crate) fn check_keys(
    config: &Map<String, Value>,
    supported: &[&[&str]],
    at_default: &[(&str, &str)],
) -> Result<()> {
    for (key, value) in config {
        if key.starts_with('_') || supported.iter().any(|s| s.contains(&key.as_str())) {
            continue;
        }
        match at_default.iter().find(|(k, _)| k == key) {
            Some((_, default)) => {
                let default: Value = serde_json::from_str(default).expect("valid default JSON");
                if !same_value(value, &default) {
                    return Err(TrainError::Config(format!(
                        "config.json: {key} = {value} is not supported (only {default})"
                    )));
                }
            }
            None => return Err(TrainError::Config(format!("config.json: unknown key {key} = {value}"))),
        }
    }
    Ok(())
}

/// The diffusers defaults of `UNet2DConditionModel` for the keys [`UNET_KEYS`] names.
fn unet_defaults() -> Map<String, Value> {
    let v = json!({
        "in_channels": 4, "out_channels": 4, "sample_size": null, "flip_sin_to_cos": true, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
        "num_attention_heads": null, "cross_attention_dim": 1280, "use_linear_projection": false,
        "norm_num_groups": 32, "norm_eps": 1e-5, "upcast_attention": false,
        "transformer_layers_per_block": 1
    });
    v.as_object().cloned().unwrap_or_default()
}

/// `addition_embed_type` with its two widths: None, or SDXL's `"text_time"`.
fn parse_text_time(config: &Map<String, Value>) -> Result<Option<TextTimeConfig>> {
    let kind: Option<String> = get(config, "addition_embed_type", Value::Null)?;
    let time: Option<usize> = get(config, "addition_time_embed_dim", Value::Null)?;
    let input: Option<usize> = get(config, "projection_class_embeddings_input_dim", Value::Null)?;
    match (kind.as_deref(), time, input) {
        (None, None, None) => Ok(None),
        (None, _, _) => Err(TrainError::Config(
            "config.json: addition_time_embed_dim and projection_class_embeddings_input_dim are given without addition_embed_type = \"text_time\"".into(),
        )),
        (Some("text_time"), Some(time_embed_dim), Some(input_dim)) => Ok(Some(TextTimeConfig { time_embed_dim, input_dim })),
        (Some("text_time"), _, _) => Err(TrainError::Config(
            "config.json: addition_embed_type = \"text_time\" needs addition_time_embed_dim and projection_class_embeddings_input_dim".into(),
        )),
        (Some(other), _, _) => Err(TrainError::Config(format!(
            "config.json: addition_embed_type = {other:?} is not supported (only null or \"text_time\", SDXL's)"
        ))),
    }
}

impl UNetConfig {
    /// From a UNet `config.json` (parsed), every key checked.
    pub fn from_unet_json(config: &Map<String, Value>) -> Result<Self> {
        check_keys(config, &[UNET_KEYS], AT_DEFAULT)?;
        Self::parse(config, true)
    }

    /// The shared settings and the extras from a ControlNet `config.json`.
    pub fn from_controlnet_json(config: &Map<String, Value>) -> Result<(Self, ControlNetExtras)> {
        check_keys(config, &[UNET_KEYS, CONTROLNET_KEYS], AT_DEFAULT)?;
        let shared = Self::parse(config, false)?;
        let extras = ControlNetExtras {
            conditioning_channels: get(config, "conditioning_channels", json!(3))?,
            conditioning_embedding_out_channels: get(
                config,
                "conditioning_embedding_out_channels",
                json!([16, 32, 96, 256]),
            )?,
        };
        let embedding = &extras.conditioning_embedding_out_channels;
        if extras.conditioning_channels > MAX_IO_CHANNELS
            || embedding.len() > MAX_LEVELS
            || embedding.iter().any(|&c| c > MAX_WIDTH)
        {
            return Err(TrainError::Config(format!(
                "config.json: conditioning_channels {} or conditioning_embedding_out_channels {embedding:?} beyond lisa's limits ({MAX_IO_CHANNELS} channels; {MAX_LEVELS} stages of at most {MAX_WIDTH})",
                extras.conditioning_channels
            )));
        }
        if extras.conditioning_channels == 0 || extras.conditioning_embedding_out_channels.is_empty() {
            return Err(TrainError::Config(
                "config.json: conditioning_channels and conditioning_embedding_out_channels must be non-empty".into(),
            ));
        }
        Ok((shared, extras))
    }

    fn parse(config: &Map<String, Value>, unet: bool) -> Result<Self> {
        let d = unet_defaults();
        let g = |key: &str| d.get(key).cloned().unwrap_or(Value::Null);
        let down_block_types: Vec<DownBlockType> = get(config, "down_block_types", g("down_block_types"))?;
        let blocks = down_block_types.len();
        let heads_key = if config.get("num_attention_heads").is_some_and(|v| !v.is_null()) {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads: PerBlock = get(config, heads_key, g("attention_head_dim"))?;
        let block_out_channels: Vec<usize> = get(config, "block_out_channels", g("block_out_channels"))?;
        let layers_key = "transformer_layers_per_block";
        let transformer_layers: PerBlock = get(config, layers_key, g(layers_key))?;
        let text_time = parse_text_time(config)?;
        let c = Self {
            in_channels: get(config, "in_channels", g("in_channels"))?,
            // A ControlNet predicts nothing itself; it shares the UNet's input.
            out_channels: if unet { get(config, "out_channels", g("out_channels"))? } else { 0 },
            sample_size: if unet { get(config, "sample_size", json!(64))? } else { 0 },
            flip_sin_to_cos: get(config, "flip_sin_to_cos", g("flip_sin_to_cos"))?,
            freq_shift: get(config, "freq_shift", g("freq_shift"))?,
            up_block_types: if unet { get(config, "up_block_types", g("up_block_types"))? } else { Vec::new() },
            heads: heads.expand(blocks, heads_key)?,
            layers_per_block: get(config, "layers_per_block", g("layers_per_block"))?,
            cross_attention_dim: get(config, "cross_attention_dim", g("cross_attention_dim"))?,
            use_linear_projection: get(config, "use_linear_projection", g("use_linear_projection"))?,
            norm_num_groups: get(config, "norm_num_groups", g("norm_num_groups"))?,
            norm_eps: get(config, "norm_eps", g("norm_eps"))?,
            upcast_attention: get(config, "upcast_attention", g("upcast_attention"))?,
            transformer_layers: transformer_layers.expand(blocks, layers_key)?,
            text_time,
            down_block_types,
            block_out_channels,
        };
        c.validate(unet)?;
        Ok(c)
    }

    fn validate(&self, unet: bool) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(format!("config.json: {m}")));
        // Bounds first, so that nothing below (nor any allocation) sees an absurd size.
        let n = self.down_block_types.len();
        let counts = [
            ("down_block_types entries", n, MAX_LEVELS),
            ("layers_per_block", self.layers_per_block, MAX_LAYERS_PER_BLOCK),
            ("in_channels", self.in_channels, MAX_IO_CHANNELS),
            ("out_channels", self.out_channels, MAX_IO_CHANNELS),
            ("cross_attention_dim", self.cross_attention_dim, MAX_WIDTH),
            ("sample_size", self.sample_size, MAX_SAMPLE_SIZE),
        ];
        let widths = self.block_out_channels.iter().map(|&c| ("a block_out_channels entry", c, MAX_WIDTH));
        let depths = self
            .transformer_layers
            .iter()
            .map(|&l| ("a transformer_layers_per_block entry", l, MAX_TRANSFORMER_LAYERS));
        for (key, value, max) in counts.into_iter().chain(widths).chain(depths) {
            if value > max {
                return bad(format!("{key} is {value}; lisa supports at most {max}"));
            }
        }
        if self.transformer_layers.contains(&0) {
            return bad("transformer_layers_per_block: every entry must be at least 1".into());
        }
        if n == 0 || self.block_out_channels.len() != n {
            return bad(format!(
                "block_out_channels has {} entries for {n} down_block_types",
                self.block_out_channels.len()
            ));
        }
        if unet && self.up_block_types.len() != n {
            return bad(format!("up_block_types has {} entries for {n} down blocks", self.up_block_types.len()));
        }
        if self.layers_per_block == 0 || self.in_channels == 0 || (unet && self.out_channels == 0) {
            return bad("layers_per_block, in_channels and out_channels must be positive".into());
        }
        if self.norm_num_groups == 0 || self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return bad("norm_num_groups and norm_eps must be positive".into());
        }
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&self.heads).enumerate() {
            if c == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!("block_out_channels[{i}] = {c} is not a multiple of norm_num_groups"));
            }
            if h == 0 || !c.is_multiple_of(h) {
                return bad(format!("block {i}: {h} attention heads do not divide {c} channels"));
            }
        }
        if self.cross_attention_dim == 0 {
            return bad("cross_attention_dim must be positive".into());
        }
        if let Some(tt) = self.text_time {
            if tt.time_embed_dim == 0 || tt.time_embed_dim > MAX_WIDTH || tt.input_dim > MAX_WIDTH {
                return bad(format!(
                    "addition_time_embed_dim {} and projection_class_embeddings_input_dim {} must lie in 1..={MAX_WIDTH}",
                    tt.time_embed_dim, tt.input_dim
                ));
            }
            if tt.input_dim <= TIME_IDS * tt.time_embed_dim {
                return bad(format!(
                    "projection_class_embeddings_input_dim {} leaves no room for the pooled text beside the {TIME_IDS} time ids of {} (it is the pooled width + {TIME_IDS} · addition_time_embed_dim)",
                    tt.input_dim, tt.time_embed_dim
                ));
            }
        }
        Ok(())
    }

    /// The settings a ControlNet must share with its UNet that differ, as `key: a vs b`.
    pub fn controlnet_mismatches(&self, controlnet: &UNetConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |key: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{key}: UNet {a} vs ControlNet {b}"));
            }
        };
        cmp("in_channels", self.in_channels.to_string(), controlnet.in_channels.to_string());
        cmp("flip_sin_to_cos", self.flip_sin_to_cos.to_string(), controlnet.flip_sin_to_cos.to_string());
        cmp("freq_shift", self.freq_shift.to_string(), controlnet.freq_shift.to_string());
        cmp("down_block_types", format!("{:?}", self.down_block_types), format!("{:?}", controlnet.down_block_types));
        cmp(
            "block_out_channels",
            format!("{:?}", self.block_out_channels),
            format!("{:?}", controlnet.block_out_channels),
        );
        cmp("layers_per_block", self.layers_per_block.to_string(), controlnet.layers_per_block.to_string());
        cmp("attention heads", format!("{:?}", self.heads), format!("{:?}", controlnet.heads));
        cmp(
            "transformer_layers_per_block",
            self.transformer_layers_per_block().to_string(),
            controlnet.transformer_layers_per_block().to_string(),
        );
        cmp("cross_attention_dim", self.cross_attention_dim.to_string(), controlnet.cross_attention_dim.to_string());
        cmp(
            "addition_embed_type text_time (addition_time_embed_dim, projection_class_embeddings_input_dim)",
            format!("{:?}", self.text_time.map(|t| (t.time_embed_dim, t.input_dim))),
            format!("{:?}", controlnet.text_time.map(|t| (t.time_embed_dim, t.input_dim))),
        );
        cmp(
            "use_linear_projection",
            self.use_linear_projection.to_string(),
            controlnet.use_linear_projection.to_string(),
        );
        cmp("norm_num_groups", self.norm_num_groups.to_string(), controlnet.norm_num_groups.to_string());
        cmp("norm_eps", self.norm_eps.to_string(), controlnet.norm_eps.to_string());
        out
    }

    /// About how many parameters the UNet and a ControlNet copied from it hold (diffusers'
    /// blocks counted by their convolutions, attention and feed-forward weights; within a few
    /// percent at SD's sizes): the size checked against memory before anything is allocated.
    pub fn parameter_estimate(&self) -> ParameterEstimate {
        let w = |c: usize| c as u128;
        let temb = 4 * w(self.block_out_channels[0]);
        let cross = w(self.cross_attention_dim);
        let resnet = |ci: u128, co: u128| 9 * ci * co + 9 * co * co + temb * co + if ci == co { 0 } else { ci * co };
        let attends = |l: usize| self.down_block_types[l] == DownBlockType::CrossAttnDownBlock2D;
        // A spatial transformer of level l: proj_in and proj_out once, then per block self-
        // and cross-attention (6c² + 2·cross·c) and the GEGLU feed-forward (12c²).
        let transformer =
            |l: usize, c: u128| 2 * c * c + self.transformer_layers_at(l) as u128 * (18 * c * c + 2 * cross * c);
        let (levels, layers) = (self.block_out_channels.len(), self.layers_per_block);
        let mut encoder = 0u128;
        let mut previous = w(self.block_out_channels[0]);
        for (l, &c) in self.block_out_channels.iter().enumerate() {
            let c = w(c);
            for i in 0..layers {
                encoder +=
                    resnet(if i == 0 { previous } else { c }, c) + if attends(l) { transformer(l, c) } else { 0 };
            }
            if l + 1 < levels {
                encoder += 9 * c * c;
            }
            previous = c;
        }
        let top = w(self.block_out_channels[levels - 1]);
        let mid = 2 * resnet(top, top) + transformer(levels - 1, top);
        // The up blocks, deepest first: each resnet reads the previous output (or its own
        // width) and one skip, the last skip from the level below.
        let mut decoder = 0u128;
        let mut previous = top;
        for l in (0..levels).rev() {
            let c = w(self.block_out_channels[l]);
            let below = w(self.block_out_channels[l.saturating_sub(1)]);
            for j in 0..=layers {
                let skip = if j == layers { below } else { c };
                let input = if j == 0 { previous } else { c };
                decoder += resnet(input + skip, c) + if attends(l) { transformer(l, c) } else { 0 };
            }
            decoder += if l > 0 { 9 * c * c } else { 0 };
            previous = c;
        }
        // The time embedding (two linear layers), conv_in, and SDXL's add_embedding (two
        // linear layers into the time embedding's width).
        let c0 = w(self.block_out_channels[0]);
        let stem = c0 * temb + temb * temb + 9 * w(self.in_channels) * c0;
        let added = self.text_time.map_or(0, |tt| w(tt.input_dim) * temb + temb * temb);
        // The ControlNet's zero convs: one 1×1 per skip (conv_in's too) and the middle; its
        // condition embedding at diffusers' default widths (16, 32, 96, 256): about 1.1 M.
        let zero_convs: u128 =
            c0 * c0 + self.block_out_channels.iter().map(|&c| w(c) * w(c) * (layers as u128 + 1)).sum::<u128>();
        let condition = 9 * (3 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 96 + 96 * 96 + 96 * 256 + 256 * c0);
        let conv_out = 9 * c0 * w(self.out_channels);
        ParameterEstimate {
            unet: stem + added + encoder + mid + decoder + conv_out,
            controlnet: stem + added + encoder + mid + zero_convs + condition,
        }
    }

    /// Transformer blocks per spatial transformer of down level `level` (1 where the config
    /// predates the key).
    pub fn transformer_layers_at(&self, level: usize) -> usize {
        self.transformer_layers.get(level).copied().unwrap_or(1)
    }

    /// `transformer_layers_per_block` as diffusers writes it: an int when every level has the
    /// same, else one per level.
    pub fn transformer_layers_per_block(&self) -> Value {
        match self.transformer_layers.as_slice() {
            [] => json!(1),
            [first, rest @ ..] if rest.iter().all(|l| l == first) => json!(first),
            all => json!(all),
        }
    }

    /// The number of skips the encoder hands the decoder: `conv_in`, one per resnet, one
    /// per downsampler (12 for SD).
    pub fn skip_count(&self) -> usize {
        1 + self.down_block_types.len() * self.layers_per_block + self.down_block_types.len() - 1
    }

    /// `{"_class_name": "ControlNetModel", …}`: what diffusers' `ControlNetModel.from_unet`
    /// writes for this UNet (the keys diffusers needs to rebuild it).
    pub fn controlnet_json(&self, extras: &ControlNetExtras) -> Value {
        let text_time = self.text_time;
        json!({
            "_class_name": "ControlNetModel",
            "_diffusers_version": "0.42.1",
            "act_fn": "silu",
            "addition_embed_type": text_time.map(|_| "text_time"),
            "addition_time_embed_dim": text_time.map(|t| t.time_embed_dim),
            "projection_class_embeddings_input_dim": text_time.map(|t| t.input_dim),
            "attention_head_dim": self.heads,
            "block_out_channels": self.block_out_channels,
            "conditioning_channels": extras.conditioning_channels,
            "conditioning_embedding_out_channels": extras.conditioning_embedding_out_channels,
            "controlnet_conditioning_channel_order": "rgb",
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": self.down_block_types,
            "downsample_padding": 1,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "global_pool_conditions": false,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "num_attention_heads": null,
            "only_cross_attention": false,
            "resnet_time_scale_shift": "default",
            "transformer_layers_per_block": self.transformer_layers_per_block(),
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection
        })
    }
}
