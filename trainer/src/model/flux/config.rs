//! diffusers' `FluxTransformer2DModel` and `FluxControlNetModel` configs: the keys lisa reads,
//! those accepted only at their default, and the checks that run before anything is built.

use serde_json::{Map, Value, json};

use crate::error::{Result, TrainError};
use crate::model::sd::check_config_keys as check_keys;
use crate::model::sd3::{BlockShape, MAX_CHANNELS, MAX_LAYERS, MAX_WIDTH, QkNorm};

/// The settings the Flux transformer and its ControlNet share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxConfig {
    /// Channels of a packed latent token (the VAE's 16 channels × a 2×2 patch = 64).
    pub in_channels: usize,
    /// Channels of an output token (the transformer; `in_channels` when null).
    pub out_channels: usize,
    /// Double-stream blocks (`transformer_blocks`).
    pub num_layers: usize,
    /// Single-stream blocks (`single_transformer_blocks`).
    pub num_single_layers: usize,
    /// Features per head.
    pub attention_head_dim: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Width of the T5 text features.
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP text.
    pub pooled_projection_dim: usize,
    /// Whether the time embedding also embeds a guidance scale (Flux-dev; not schnell).
    pub guidance_embeds: bool,
    /// Features of every head turned by each position axis (text, height, width).
    pub axes_dims_rope: Vec<usize>,
}

/// What only a ControlNet config sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FluxControlNetExtras {
    /// Union mode: this many control types, one learned token each, prepended to the text.
    pub num_mode: Option<usize>,
}

/// The keys lisa reads.
const KEYS: &[&str] = &[
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
];

/// ControlNet-only keys lisa reads.
const CONTROLNET_KEYS: &[&str] = &["num_mode"];

/// Keys accepted only at this value (JSON): lisa's Flux takes packed 2×2 latents as tokens
/// (`patch_size` 1) and VAE-encoded conditions (no pixel-space `input_hint_block`).
const AT_DEFAULT: &[(&str, &str)] = &[("patch_size", "1"), ("conditioning_embedding_channels", "null")];

/// The rotary base of `FluxPosEmbed`.
pub const ROPE_THETA: f64 = 10000.0;

/// The ε of Flux's norms.
pub const FLUX_NORM_EPS: f32 = 1e-6;

fn defaults() -> Map<String, Value> {
    let v = json!({
        "in_channels": 64, "out_channels": null, "num_layers": 19, "num_single_layers": 38,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": false, "axes_dims_rope": [16, 56, 56], "num_mode": null
    });
    v.as_object().cloned().unwrap_or_default()
}

/// `config[key]`, or diffusers' default.
fn get<T: serde::de::DeserializeOwned>(config: &Map<String, Value>, key: &str) -> Result<T> {
    crate::model::sd::config_value(config, key, defaults()[key].clone())
}

impl FluxConfig {
    /// From a `FluxTransformer2DModel` `config.json` (parsed), every key checked.
    pub fn from_transformer_json(config: &Map<String, Value>) -> Result<Self> {
        check_keys(config, &[KEYS], AT_DEFAULT)?;
        Self::parse(config)
    }

    /// From a `FluxControlNetModel` `config.json`: the shared settings and the extras.
    pub fn from_controlnet_json(config: &Map<String, Value>) -> Result<(Self, FluxControlNetExtras)> {
        check_keys(config, &[KEYS, CONTROLNET_KEYS], AT_DEFAULT)?;
        let shared = Self::parse(config)?;
        let num_mode: Option<usize> = get(config, "num_mode")?;
        if let Some(n) = num_mode
            && (n == 0 || n > MAX_CHANNELS)
        {
            return Err(TrainError::Config(format!("config.json: num_mode = {n} must lie in 1..={MAX_CHANNELS}")));
        }
        Ok((shared, FluxControlNetExtras { num_mode }))
    }

    fn parse(config: &Map<String, Value>) -> Result<Self> {
        let in_channels: usize = get(config, "in_channels")?;
        let out_channels: Option<usize> = get(config, "out_channels")?;
        let c = Self {
            in_channels,
            out_channels: out_channels.unwrap_or(in_channels),
            num_layers: get(config, "num_layers")?,
            num_single_layers: get(config, "num_single_layers")?,
            attention_head_dim: get(config, "attention_head_dim")?,
            num_attention_heads: get(config, "num_attention_heads")?,
            joint_attention_dim: get(config, "joint_attention_dim")?,
            pooled_projection_dim: get(config, "pooled_projection_dim")?,
            guidance_embeds: get(config, "guidance_embeds")?,
            axes_dims_rope: get(config, "axes_dims_rope")?,
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(format!("config.json: {m}")));
        for (key, value, max) in [
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("attention_head_dim", self.attention_head_dim, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("joint_attention_dim", self.joint_attention_dim, MAX_WIDTH),
            ("pooled_projection_dim", self.pooled_projection_dim, MAX_WIDTH),
        ] {
            if value == 0 || value > max {
                return bad(format!("{key} = {value} must lie in 1..={max}"));
            }
        }
        if self.num_single_layers > MAX_LAYERS {
            return bad(format!("num_single_layers = {} must lie in 0..={MAX_LAYERS}", self.num_single_layers));
        }
        if self.inner_dim() > MAX_WIDTH {
            return bad(format!(
                "num_attention_heads × attention_head_dim = {} is beyond lisa's limit of {MAX_WIDTH}",
                self.inner_dim()
            ));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if self.axes_dims_rope.is_empty()
            || self.axes_dims_rope.iter().any(|d| *d == 0 || !d.is_multiple_of(2))
            || rope != self.attention_head_dim
        {
            return bad(format!(
                "axes_dims_rope {:?} must be even widths that add up to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }

    /// Heads × head dim: the width of every token.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The blocks' attention shape (RMS query/key norms, always).
    pub fn block_shape(&self) -> BlockShape {
        BlockShape { heads: self.num_attention_heads, head_dim: self.attention_head_dim, qk_norm: Some(QkNorm::Rms) }
    }

    /// The parameters of the transformer with this config (`controlnet`: None) or of a
    /// ControlNet with it (`Some(extras)`), counted exactly from diffusers' modules: the
    /// timestep (+ guidance) + pooled-text embedding, the text and latent embedders, per
    /// double block two AdaLN-Zero modulations (6d each), the joint attention (q, k, v and out
    /// per stream, RMS q/k norms) and two GELU MLPs (4d); per single block its modulation
    /// (3d), q, k, v, the MLP in (4d) and the output over attention ‖ MLP (5d → d). The
    /// transformer ends with `norm_out` and `proj_out`; a ControlNet has instead one zero
    /// linear per block, `controlnet_x_embedder` and, in union mode, the mode embedding.
    pub fn parameter_count(&self, controlnet: Option<FluxControlNetExtras>) -> u128 {
        let (d, head) = (self.inner_dim() as u128, self.attention_head_dim as u128);
        let linear = |i: u128, o: u128| i * o + o;
        let mlp_embedder = |i: u128| linear(i, d) + linear(d, d);
        let embeddings = mlp_embedder(256) * if self.guidance_embeds { 2 } else { 1 }
            + mlp_embedder(self.pooled_projection_dim as u128)
            + linear(self.joint_attention_dim as u128, d)
            + linear(self.in_channels as u128, d);
        let double = 2 * linear(d, 6 * d) + 8 * linear(d, d) + 4 * head + 2 * (linear(d, 4 * d) + linear(4 * d, d));
        let single = linear(d, 3 * d) + 3 * linear(d, d) + 2 * head + linear(d, 4 * d) + linear(5 * d, d);
        let blocks = self.num_layers as u128 * double + self.num_single_layers as u128 * single;
        embeddings
            + blocks
            + match controlnet {
                None => linear(d, 2 * d) + linear(d, self.out_channels as u128),
                Some(extras) => {
                    (self.num_layers + self.num_single_layers) as u128 * linear(d, d)
                        + linear(self.in_channels as u128, d)
                        + extras.num_mode.map_or(0, |n| n as u128 * d)
                }
            }
    }

    /// The ControlNet's settings must match the transformer's in everything it shares (the
    /// block counts aside: a ControlNet has fewer).
    pub fn check_controlnet(&self, controlnet: &FluxConfig) -> Result<()> {
        let pairs = [
            ("in_channels", self.in_channels, controlnet.in_channels),
            ("attention_head_dim", self.attention_head_dim, controlnet.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads, controlnet.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim, controlnet.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim, controlnet.pooled_projection_dim),
            ("guidance_embeds", self.guidance_embeds as usize, controlnet.guidance_embeds as usize),
        ];
        for (key, want, got) in pairs {
            if want != got {
                return Err(TrainError::Config(format!(
                    "the ControlNet does not fit the transformer: its {key} is {got}, the transformer's {want}"
                )));
            }
        }
        if controlnet.axes_dims_rope != self.axes_dims_rope {
            return Err(TrainError::Config(format!(
                "the ControlNet does not fit the transformer: its axes_dims_rope is {:?}, the transformer's {:?}",
                controlnet.axes_dims_rope, self.axes_dims_rope
            )));
        }
        for (key, theirs, ours) in [
            ("num_layers", controlnet.num_layers, self.num_layers),
            ("num_single_layers", controlnet.num_single_layers, self.num_single_layers),
        ] {
            if theirs > ours {
                return Err(TrainError::Config(format!(
                    "the ControlNet's {key} is {theirs}, more than the transformer's {ours}"
                )));
            }
        }
        Ok(())
    }

    /// The config of diffusers' `FluxControlNetModel.from_transformer(transformer, num_layers,
    /// num_single_layers)`: the same settings with fewer blocks (at most the transformer's).
    pub fn controlnet_from_transformer(&self, num_layers: usize, num_single_layers: usize) -> Result<Self> {
        let c = Self { num_layers, num_single_layers, ..self.clone() };
        if num_layers == 0 || num_layers > self.num_layers || num_single_layers > self.num_single_layers {
            return Err(TrainError::Config(format!(
                "a ControlNet of {num_layers} double- and {num_single_layers} single-stream blocks made from a transformer of {} and {}: it takes 1..={} and 0..={} (--num-double-layers, --num-single-layers)",
                self.num_layers, self.num_single_layers, self.num_layers, self.num_single_layers
            )));
        }
        self.check_controlnet(&c)?;
        Ok(c)
    }

    /// `{"_class_name": "FluxControlNetModel", …}`: the keys diffusers 0.42.1 writes, as its
    /// `from_pretrained` reads them back.
    pub fn controlnet_json(&self, extras: FluxControlNetExtras) -> Value {
        json!({
            "_class_name": "FluxControlNetModel",
            "_diffusers_version": "0.42.1",
            "patch_size": 1,
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": self.axes_dims_rope,
            "num_mode": extras.num_mode,
            "conditioning_embedding_channels": null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Map<String, Value> {
        let mut c = json!({
            "_class_name": "FluxTransformer2DModel", "in_channels": 16, "num_layers": 2, "num_single_layers": 3,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
            "pooled_projection_dim": 10, "guidance_embeds": true, "axes_dims_rope": [2, 2, 4]
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.as_object().unwrap().clone()
    }

    #[test]
    fn reads_the_keys_and_names_bad_ones() {
        let c = FluxConfig::from_transformer_json(&config(json!({}))).unwrap();
        assert_eq!((c.out_channels, c.inner_dim(), c.guidance_embeds), (16, 16, true), "out_channels null = in");
        let err = |extra: Value| FluxConfig::from_transformer_json(&config(extra)).unwrap_err().to_string();
        assert!(err(json!({"axes_dims_rope": [2, 2, 2]})).contains("add up to attention_head_dim 8"));
        assert!(err(json!({"patch_size": 2})).contains("patch_size"));
        assert!(err(json!({"num_layers": 0})).contains("num_layers = 0"));
        assert!(err(json!({"mystery": 1})).contains("mystery"));
        let (_, extras) = FluxConfig::from_controlnet_json(&config(json!({"num_mode": 10}))).unwrap();
        assert_eq!(extras.num_mode, Some(10));
        let hint = config(json!({"conditioning_embedding_channels": 16}));
        assert!(FluxConfig::from_controlnet_json(&hint).unwrap_err().to_string().contains("conditioning_embedding"));
    }

    #[test]
    fn a_controlnet_must_fit_its_transformer() {
        let c = FluxConfig::from_transformer_json(&config(json!({}))).unwrap();
        let cn = c.controlnet_from_transformer(1, 2).unwrap();
        assert_eq!((cn.num_layers, cn.num_single_layers), (1, 2));
        assert!(c.controlnet_from_transformer(3, 0).unwrap_err().to_string().contains("it takes 1..=2 and 0..=3"));
        let other = FluxConfig { guidance_embeds: false, ..cn };
        assert!(c.check_controlnet(&other).unwrap_err().to_string().contains("guidance_embeds"));
    }
}
