//! diffusers' `SD3Transformer2DModel` and `SD3ControlNetModel` configs: the supported keys,
//! those accepted only at their default, and the checks that run before anything is built.

use serde_json::{Map, Value, json};

use crate::error::{Result, TrainError};
use crate::model::sd::check_config_keys as check_keys;

/// The most blocks, heads, channels and positions lisa builds from a config (far above
/// SD3.5 Large's 38 blocks of 38 heads × 64, 16 channels, 192 positions per side).
pub const MAX_LAYERS: usize = 256;
/// The widest attention (heads × head dim) and the widest text features.
pub const MAX_WIDTH: usize = 1 << 16;
/// The most latent channels, and positions per side.
pub const MAX_CHANNELS: usize = 1024;

/// The query/key normalisation of the attention layers (`qk_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// RMS norm over each head's features, with a learned scale (SD3.5).
    Rms,
}

/// The shared settings of the SD3 transformer and its ControlNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sd3Config {
    /// Latent side the model was trained at (sets the positions' `base_size`).
    pub sample_size: usize,
    /// Side of a patch.
    pub patch_size: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out (the transformer; the ControlNet ignores it).
    pub out_channels: usize,
    /// Joint transformer blocks.
    pub num_layers: usize,
    /// Features per head.
    pub attention_head_dim: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Width of the text features (T5 and CLIP, joined).
    pub joint_attention_dim: usize,
    /// Width the text features are projected to (= heads × head dim).
    pub caption_projection_dim: usize,
    /// Width of the pooled text projections (the CLIPs').
    pub pooled_projection_dim: usize,
    /// Positions per side of the sin-cos table the patch grid is cropped from.
    pub pos_embed_max_size: usize,
    /// Blocks with a second (image-only) attention (SD3.5).
    pub dual_attention_layers: Vec<usize>,
    /// Query/key normalisation (None: SD3).
    pub qk_norm: Option<QkNorm>,
}

/// What only a ControlNet config sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sd3ControlNetExtras {
    /// Channels of the condition latents beyond `in_channels` (an inpainting mask, say).
    pub extra_conditioning_channels: usize,
    /// Whether pipelines feed the ControlNet zeros as pooled projections (a pipeline setting,
    /// kept for the config's round trip).
    pub force_zeros_for_pooled_projection: bool,
}

/// The keys lisa reads.
const KEYS: &[&str] = &[
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
];

/// ControlNet-only keys lisa reads.
const CONTROLNET_KEYS: &[&str] = &["extra_conditioning_channels", "force_zeros_for_pooled_projection"];

/// Keys accepted only at this value (JSON): the SD3.5 8B ControlNet's variant without its own
/// positions is not supported.
const AT_DEFAULT: &[(&str, &str)] = &[("pos_embed_type", "\"sincos\""), ("use_pos_embed", "true")];

fn defaults() -> Map<String, Value> {
    let v = json!({
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 18,
        "attention_head_dim": 64, "num_attention_heads": 18, "joint_attention_dim": 4096,
        "caption_projection_dim": 1152, "pooled_projection_dim": 2048, "pos_embed_max_size": 96,
        "dual_attention_layers": [], "qk_norm": null,
        "extra_conditioning_channels": 0, "force_zeros_for_pooled_projection": true
    });
    v.as_object().cloned().unwrap_or_default()
}

/// `config[key]`, or diffusers' default.
fn get<T: serde::de::DeserializeOwned>(config: &Map<String, Value>, key: &str) -> Result<T> {
    crate::model::sd::config_value(config, key, defaults()[key].clone())
}

impl Sd3Config {
    /// From an `SD3Transformer2DModel` `config.json` (parsed), every key checked.
    pub fn from_transformer_json(config: &Map<String, Value>) -> Result<Self> {
        check_keys(config, &[KEYS], AT_DEFAULT)?;
        Self::parse(config)
    }

    /// From an `SD3ControlNetModel` `config.json`: the shared settings and the extras.
    pub fn from_controlnet_json(config: &Map<String, Value>) -> Result<(Self, Sd3ControlNetExtras)> {
        check_keys(config, &[KEYS, CONTROLNET_KEYS], AT_DEFAULT)?;
        let shared = Self::parse(config)?;
        let extras = Sd3ControlNetExtras {
            extra_conditioning_channels: get(config, "extra_conditioning_channels")?,
            force_zeros_for_pooled_projection: get(config, "force_zeros_for_pooled_projection")?,
        };
        if shared.in_channels + extras.extra_conditioning_channels > MAX_CHANNELS {
            return Err(TrainError::Config(format!(
                "config.json: extra_conditioning_channels {} beyond lisa's limit of {MAX_CHANNELS} channels",
                extras.extra_conditioning_channels
            )));
        }
        Ok((shared, extras))
    }

    fn parse(config: &Map<String, Value>) -> Result<Self> {
        let qk_norm: Option<String> = get(config, "qk_norm")?;
        let qk_norm = match qk_norm.as_deref() {
            None => None,
            Some("rms_norm") => Some(QkNorm::Rms),
            Some(other) => {
                return Err(TrainError::Config(format!(
                    "config.json: qk_norm = {other:?} is not supported (null or \"rms_norm\", as SD3 and SD3.5)"
                )));
            }
        };
        let c = Self {
            sample_size: get(config, "sample_size")?,
            patch_size: get(config, "patch_size")?,
            in_channels: get(config, "in_channels")?,
            out_channels: get(config, "out_channels")?,
            num_layers: get(config, "num_layers")?,
            attention_head_dim: get(config, "attention_head_dim")?,
            num_attention_heads: get(config, "num_attention_heads")?,
            joint_attention_dim: get(config, "joint_attention_dim")?,
            caption_projection_dim: get(config, "caption_projection_dim")?,
            pooled_projection_dim: get(config, "pooled_projection_dim")?,
            pos_embed_max_size: get(config, "pos_embed_max_size")?,
            dual_attention_layers: get(config, "dual_attention_layers")?,
            qk_norm,
        };
        c.validate()?;
        Ok(c)
    }

    /// The blocks' attention shape: heads, head dim, query/key norm.
    pub fn block_shape(&self) -> super::block::BlockShape {
        super::block::BlockShape {
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            qk_norm: self.qk_norm,
        }
    }

    /// Heads × head dim: the width of every token.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(format!("config.json: {m}")));
        for (key, value, max) in [
            ("sample_size", self.sample_size, MAX_CHANNELS * 16),
            ("patch_size", self.patch_size, 64),
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("attention_head_dim", self.attention_head_dim, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("joint_attention_dim", self.joint_attention_dim, MAX_WIDTH),
            ("caption_projection_dim", self.caption_projection_dim, MAX_WIDTH),
            ("pooled_projection_dim", self.pooled_projection_dim, MAX_WIDTH),
            ("pos_embed_max_size", self.pos_embed_max_size, MAX_CHANNELS),
        ] {
            if value == 0 || value > max {
                return bad(format!("{key} = {value} must lie in 1..={max}"));
            }
        }
        if self.inner_dim() > MAX_WIDTH {
            return bad(format!(
                "num_attention_heads × attention_head_dim = {} is beyond lisa's limit of {MAX_WIDTH}",
                self.inner_dim()
            ));
        }
        if self.caption_projection_dim != self.inner_dim() {
            return bad(format!(
                "caption_projection_dim {} must equal num_attention_heads × attention_head_dim = {} (the text tokens join the image tokens' attention)",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return bad(format!("the width {} must be a multiple of 4 (2-D sin-cos positions)", self.inner_dim()));
        }
        if !self.sample_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "sample_size {} is not a multiple of patch_size {}",
                self.sample_size, self.patch_size
            ));
        }
        if let Some(&l) = self.dual_attention_layers.iter().find(|&&l| l >= self.num_layers) {
            return bad(format!("dual_attention_layers names block {l}; there are {} blocks", self.num_layers));
        }
        Ok(())
    }

    /// Patches per side of a latent of side `side` (an error when it does not tile, or when
    /// the grid exceeds the position table).
    pub fn grid(&self, side: usize) -> Result<usize> {
        if side == 0 || !side.is_multiple_of(self.patch_size) {
            return Err(TrainError::Config(format!(
                "a latent side of {side} is not a positive multiple of patch_size {}",
                self.patch_size
            )));
        }
        let grid = side / self.patch_size;
        if grid > self.pos_embed_max_size {
            return Err(TrainError::Config(format!(
                "a latent side of {side} makes {grid} patches per side; the positions go up to pos_embed_max_size {}",
                self.pos_embed_max_size
            )));
        }
        Ok(grid)
    }

    /// The numbers in the weights file of the transformer with this config (`controlnet`:
    /// None) or of a ControlNet with it (`Some(extras)`): diffusers' parameters plus the
    /// stored sin-cos position table (`pos_embed.pos_embed`, a buffer of `pos_embed_max_size`²
    /// × width). Counted from diffusers' modules: the patch embedding, the timestep and
    /// pooled-text embedding, the context embedder; per joint block the AdaLN-Zero modulations
    /// (6d, 9d with the second attention of SD3.5's dual blocks; 2d for the text of the
    /// transformer's last block, which ends the text stream), q, k, v for both streams, their
    /// outputs, the optional RMS q/k norms, and the two GELU MLPs (4d); the transformer ends
    /// with `norm_out` and `proj_out`, a ControlNet has instead one zero linear per block and
    /// the condition's patch embedding.
    pub fn parameter_count(&self, controlnet: Option<Sd3ControlNetExtras>) -> u128 {
        let (d, head, patch) = (self.inner_dim() as u128, self.attention_head_dim as u128, self.patch_size as u128);
        let linear = |i: u128, o: u128| i * o + o;
        let patch_embed = |channels: u128| linear(channels * patch * patch, d);
        let norms = if self.qk_norm.is_some() { 1 } else { 0 };
        let embeddings = (self.pos_embed_max_size as u128).pow(2) * d
            + patch_embed(self.in_channels as u128)
            + linear(256, d)
            + linear(d, d)
            + linear(self.pooled_projection_dim as u128, d)
            + linear(d, d)
            + linear(self.joint_attention_dim as u128, self.caption_projection_dim as u128);
        let mlp = linear(d, 4 * d) + linear(4 * d, d);
        let block = |i: usize| {
            let dual = self.dual_attention_layers.contains(&i);
            // The transformer's last block ends the text stream (diffusers' context_pre_only).
            let last = controlnet.is_none() && i + 1 == self.num_layers;
            let image = linear(d, if dual { 9 } else { 6 } * d) + 4 * linear(d, d) + 2 * norms * head + mlp;
            let second = if dual { 4 * linear(d, d) + 2 * norms * head } else { 0 };
            let text =
                if last { linear(d, 2 * d) + 3 * linear(d, d) } else { linear(d, 6 * d) + 4 * linear(d, d) + mlp }
                    + 2 * norms * head;
            image + second + text
        };
        let blocks: u128 = (0..self.num_layers).map(block).sum();
        embeddings
            + blocks
            + match controlnet {
                None => linear(d, 2 * d) + linear(d, patch * patch * self.out_channels as u128),
                Some(extras) => {
                    self.num_layers as u128 * linear(d, d)
                        + patch_embed((self.in_channels + extras.extra_conditioning_channels) as u128)
                }
            }
    }

    /// The ControlNet's settings must match the transformer's in everything it shares
    /// (`num_layers` aside: a ControlNet has fewer blocks).
    pub fn check_controlnet(&self, controlnet: &Sd3Config) -> Result<()> {
        let pairs = [
            ("sample_size", self.sample_size, controlnet.sample_size),
            ("patch_size", self.patch_size, controlnet.patch_size),
            ("in_channels", self.in_channels, controlnet.in_channels),
            ("attention_head_dim", self.attention_head_dim, controlnet.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads, controlnet.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim, controlnet.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim, controlnet.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim, controlnet.pooled_projection_dim),
            ("pos_embed_max_size", self.pos_embed_max_size, controlnet.pos_embed_max_size),
        ];
        for (key, want, got) in pairs {
            if want != got {
                return Err(TrainError::Config(format!(
                    "the ControlNet does not fit the transformer: its {key} is {got}, the transformer's {want}"
                )));
            }
        }
        if controlnet.qk_norm != self.qk_norm {
            return Err(TrainError::Config("the ControlNet does not fit the transformer: qk_norm differs".into()));
        }
        if controlnet.num_layers > self.num_layers {
            return Err(TrainError::Config(format!(
                "the ControlNet has {} blocks, more than the transformer's {}",
                controlnet.num_layers, self.num_layers
            )));
        }
        Ok(())
    }
}

impl Sd3Config {
    /// The config of the ControlNet diffusers' `SD3ControlNetModel.from_transformer(transformer,
    /// num_layers, num_extra_conditioning_channels)` makes from this transformer: the same
    /// settings with `num_layers` blocks. It must have fewer blocks than the transformer (the
    /// transformer's last block drops the text tokens, a ControlNet's do not: diffusers itself
    /// fails to copy that block).
    pub fn controlnet_from_transformer(&self, num_layers: usize) -> Result<Self> {
        if num_layers == 0 || num_layers >= self.num_layers {
            return Err(TrainError::Config(format!(
                "a ControlNet of {num_layers} blocks for a transformer of {}: it needs 1..={} (the last block cannot be copied)",
                self.num_layers,
                self.num_layers - 1
            )));
        }
        Ok(Self {
            num_layers,
            dual_attention_layers: self.dual_attention_layers.iter().copied().filter(|&l| l < num_layers).collect(),
            ..self.clone()
        })
    }

    /// `{"_class_name": "SD3ControlNetModel", …}`: every key diffusers 0.42.1 writes, as its
    /// `from_pretrained` reads them back.
    pub fn controlnet_json(&self, extras: Sd3ControlNetExtras) -> Value {
        json!({
            "_class_name": "SD3ControlNetModel",
            "_diffusers_version": "0.42.1",
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "caption_projection_dim": self.caption_projection_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "pos_embed_max_size": self.pos_embed_max_size,
            "extra_conditioning_channels": extras.extra_conditioning_channels,
            "dual_attention_layers": self.dual_attention_layers,
            "qk_norm": self.qk_norm.map(|QkNorm::Rms| "rms_norm"),
            "pos_embed_type": "sincos",
            "use_pos_embed": true,
            "force_zeros_for_pooled_projection": extras.force_zeros_for_pooled_projection,
        })
    }
}
