//! diffusers' `AutoencoderKL` (the SD 1.x/2.x VAE): the encoder that turns images into the
//! latents training reads (`mean · scaling_factor`), and the decoder that turns latents back
//! into images (validation grids). Both frozen; weights with diffusers' names, including the
//! older attention names (`query`, `key`, `value`, `proj_attn`) that diffusers renames on load.

use std::path::Path;

use lisa_core::backend::{Backend, GroupNormParams, Shape};
use serde_json::{Map, Value, json};

use super::config::{MAX_IO_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_LEVELS, MAX_WIDTH};
use super::folder::read_diffusers_weights;
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::{
    AttentionConfig, Conv2d, Conv2dConfig, GroupNorm, MultiHeadAttention, ResBlock, ResBlockConfig, Upsample,
    VAE_ATTENTION,
};
use crate::params::{Bound, ParamStore, Scope};
use crate::weights::load_tensors;

/// diffusers' group-norm ε throughout the VAE.
pub const VAE_NORM_EPS: f32 = 1e-6;

/// The supported keys of an `AutoencoderKL` `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels (3).
    pub in_channels: usize,
    /// Decoded channels (3).
    pub out_channels: usize,
    /// Latent channels (4).
    pub latent_channels: usize,
    /// Channels per level (`[128, 256, 512, 512]` in SD); the images are
    /// `2^(levels − 1)` times the latents' side.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Groups of every group norm (32).
    pub norm_num_groups: usize,
    /// Latents are `(mean − shift_factor) · scaling_factor` (0.18215 for SD 1.x/2.x, 1.5305
    /// for SD3).
    pub scaling_factor: f32,
    /// The shift of the latents (0 when `null`, as in SD 1.x/2.x; 0.0609 for SD3).
    pub shift_factor: f32,
    /// Whether the encoder's moments pass a 1×1 `quant_conv` (false in SD3's VAE).
    pub use_quant_conv: bool,
    /// Whether the decoder's input passes a 1×1 `post_quant_conv` (false in SD3's VAE).
    pub use_post_quant_conv: bool,
    /// diffusers' `force_upcast` (default true): the VAE overflows in fp16, so SDXL's
    /// pipelines run it in f32 when the rest is fp16 (false in fp16-fixed VAEs).
    pub force_upcast: bool,
}

/// Keys accepted only at their default.
fn at_default() -> Vec<(&'static str, Value)> {
    vec![
        ("act_fn", json!("silu")),
        ("latents_mean", Value::Null),
        ("latents_std", Value::Null),
        ("mid_block_add_attention", json!(true)),
    ]
}

/// Keys with no effect on the computation here.
const IGNORED: &[&str] = &["sample_size"];

impl VaeConfig {
    /// From a VAE `config.json`; other keys, other values and other block types are errors
    /// naming them.
    pub fn from_json(c: &Map<String, Value>) -> Result<Self> {
        let defaults = at_default();
        let supported = [
            "in_channels",
            "out_channels",
            "latent_channels",
            "block_out_channels",
            "layers_per_block",
            "norm_num_groups",
            "scaling_factor",
            "shift_factor",
            "use_quant_conv",
            "use_post_quant_conv",
            "force_upcast",
            "down_block_types",
            "up_block_types",
        ];
        for (key, value) in c {
            if key.starts_with('_') || supported.contains(&key.as_str()) || IGNORED.contains(&key.as_str()) {
                continue;
            }
            match defaults.iter().find(|(k, _)| k == key) {
                Some((_, d)) if value == d || (value.as_f64().is_some() && value.as_f64() == d.as_f64()) => {}
                Some((_, d)) => {
                    return Err(TrainError::Config(format!(
                        "vae config.json: {key} = {value} is not supported (only {d})"
                    )));
                }
                None => return Err(TrainError::Config(format!("vae config.json: unknown key {key} = {value}"))),
            }
        }
        let get = |key: &str, default: Value| -> Result<Value> {
            Ok(c.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default))
        };
        let parse = |key: &str, default: Value| -> Result<usize> {
            let v = get(key, default)?;
            v.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| TrainError::Config(format!("vae config.json: {key} = {v} is not a count")))
        };
        let boc: Vec<usize> = serde_json::from_value(get("block_out_channels", json!([64]))?)
            .map_err(|e| TrainError::Config(format!("vae config.json: block_out_channels: {e}")))?;
        let n = boc.len();
        for (key, kind) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            let types: Vec<String> = serde_json::from_value(get(key, json!(vec![kind; n]))?)
                .map_err(|e| TrainError::Config(format!("vae config.json: {key}: {e}")))?;
            if types.len() != n || types.iter().any(|t| t != kind) {
                return Err(TrainError::Config(format!(
                    "vae config.json: {key} = {types:?}: only {n} × {kind} (one per block_out_channels entry) is supported"
                )));
            }
        }
        let scaling = get("scaling_factor", json!(0.18215))?;
        let shift = get("shift_factor", json!(0.0))?;
        let flag = |key: &str| -> Result<bool> {
            get(key, json!(true))?
                .as_bool()
                .ok_or_else(|| TrainError::Config(format!("vae config.json: {key} is not true or false")))
        };
        let config =
            Self {
                in_channels: parse("in_channels", json!(3))?,
                out_channels: parse("out_channels", json!(3))?,
                latent_channels: parse("latent_channels", json!(4))?,
                layers_per_block: parse("layers_per_block", json!(1))?,
                norm_num_groups: parse("norm_num_groups", json!(32))?,
                scaling_factor: scaling.as_f64().filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                    TrainError::Config(format!("vae config.json: scaling_factor = {scaling} must be > 0"))
                })? as f32,
                shift_factor: shift.as_f64().filter(|v| v.is_finite()).ok_or_else(|| {
                    TrainError::Config(format!("vae config.json: shift_factor = {shift} is not a number"))
                })? as f32,
                use_quant_conv: flag("use_quant_conv")?,
                use_post_quant_conv: flag("use_post_quant_conv")?,
                force_upcast: flag("force_upcast")?,
                block_out_channels: boc,
            };
        let c = &config;
        let too_big = [c.in_channels, c.out_channels, c.latent_channels].iter().any(|&x| x > MAX_IO_CHANNELS)
            || n > MAX_LEVELS
            || c.layers_per_block > MAX_LAYERS_PER_BLOCK
            || c.block_out_channels.iter().any(|&x| x > MAX_WIDTH);
        if too_big {
            return Err(TrainError::Config(format!(
                "vae config.json: sizes beyond lisa's limits (at most {MAX_LEVELS} blocks of {MAX_WIDTH} channels, {MAX_LAYERS_PER_BLOCK} layers each, {MAX_IO_CHANNELS} image or latent channels)"
            )));
        }
        if n == 0
            || config.layers_per_block == 0
            || config.norm_num_groups == 0
            || config.block_out_channels.iter().any(|c| *c == 0 || !c.is_multiple_of(config.norm_num_groups))
        {
            return Err(TrainError::Config(format!(
                "vae config.json: block_out_channels {:?} must be positive multiples of norm_num_groups {}",
                config.block_out_channels, config.norm_num_groups
            )));
        }
        Ok(config)
    }

    /// Image side / latent side.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The latent side of images `resolution` pixels a side ([`latent_side`]).
    pub fn latent_side(&self, resolution: usize) -> Result<usize> {
        latent_side(resolution, self.downscale())
    }
}

/// The downscale of Stable Diffusion's VAEs (four levels), for a pipeline whose `vae/` is not
/// at hand.
pub const SD_VAE_DOWNSCALE: usize = 8;

/// The latent side of images `resolution` pixels a side through a VAE that downscales by
/// `factor`: an error unless `resolution` is a positive multiple of it.
pub fn latent_side(resolution: usize, factor: usize) -> Result<usize> {
    if resolution == 0 || factor == 0 || !resolution.is_multiple_of(factor) {
        return Err(TrainError::Mismatch(format!(
            "{resolution} px is not a positive multiple of the VAE's downscale {factor}"
        )));
    }
    Ok(resolution / factor)
}

fn norm(c: &VaeConfig) -> GroupNormParams {
    GroupNormParams { groups: c.norm_num_groups, eps: VAE_NORM_EPS }
}

fn resnet<B: Backend>(s: &mut ParamStore<B>, at: Scope, c_in: usize, c_out: usize, c: &VaeConfig) -> Result<ResBlock> {
    ResBlock::new(s, at, ResBlockConfig { in_channels: c_in, out_channels: c_out, time_dim: 0, norm: norm(c) })
}

/// `UNetMidBlock2D` of the VAE: resnet, single-head self-attention over the pixels with a
/// residual, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_0: ResBlock,
    norm: GroupNorm,
    attention: MultiHeadAttention,
    resnet_1: ResBlock,
}

impl MidBlock {
    fn new<B: Backend>(s: &mut ParamStore<B>, at: Scope, ch: usize, c: &VaeConfig) -> Result<Self> {
        let a = at.pp("attentions").pp(0);
        let config = AttentionConfig { names: VAE_ATTENTION, ..AttentionConfig::diffusers(ch, ch, 1) };
        Ok(Self {
            resnet_0: resnet(s, at.pp("resnets").pp(0), ch, ch, c)?,
            norm: GroupNorm::new(s, a.pp("group_norm"), ch, norm(c))?,
            attention: MultiHeadAttention::new(s, a, config)?,
            resnet_1: resnet(s, at.pp("resnets").pp(1), ch, ch, c)?,
        })
    }

    fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let h = self.resnet_0.forward_with(p, x, None)?;
        let s = B::shape(&h.value);
        let (b, ch, hh, ww) = (s.dims()[0], s.dims()[1], s.dims()[2], s.dims()[3]);
        // [b, c, h, w] → [b, h·w, c] tokens, attention, back, plus the residual.
        let tokens = t.permute(&t.reshape(&self.norm.forward(p, &h)?, &Shape::new([b, ch, hh * ww]))?, &[0, 2, 1])?;
        let out = self.attention.forward(p, &tokens, None)?;
        let out = t.reshape(&t.permute(&out, &[0, 2, 1])?, &s)?;
        let h = t.add(&out, &h)?;
        self.resnet_1.forward_with(p, &h, None)
    }
}

/// The encoder's stride-2 downsampler: zero padding (0, 1, 0, 1) then a 3×3 conv with no
/// padding (diffusers' `Downsample2D(padding=0)`).
#[derive(Debug, Clone)]
struct AsymmetricDownsample(Conv2d);

impl AsymmetricDownsample {
    fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        self.0.forward(p, &p.tape.pad_spatial(x, [0, 1, 0, 1])?)
    }
}

/// The VAE.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    config: VaeConfig,
    enc_conv_in: Conv2d,
    enc_down: Vec<(Vec<ResBlock>, Option<AsymmetricDownsample>)>,
    enc_mid: MidBlock,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dec_conv_in: Conv2d,
    dec_mid: MidBlock,
    dec_up: Vec<(Vec<ResBlock>, Option<Upsample>)>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
}

impl AutoencoderKl {
    /// Parameters under `at` with diffusers' names (`encoder.*`, `quant_conv`,
    /// `post_quant_conv`, `decoder.*`).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &VaeConfig) -> Result<Self> {
        let at = at.into();
        let (encoder, decoder) = (at.pp("encoder"), at.pp("decoder"));
        let boc = &c.block_out_channels;
        let (first, last) = (boc[0], boc[boc.len() - 1]);
        let mut enc_down = Vec::new();
        let mut ch = first;
        for (i, &out) in boc.iter().enumerate() {
            let block = encoder.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            for l in 0..c.layers_per_block {
                resnets.push(resnet(s, block.pp("resnets").pp(l), if l == 0 { ch } else { out }, out, c)?);
            }
            let down = if i + 1 < boc.len() {
                let conv = Conv2dConfig::new(out, out, 3).stride(2).padding(0);
                Some(AsymmetricDownsample(Conv2d::new(s, block.pp("downsamplers").pp(0).pp("conv"), conv)?))
            } else {
                None
            };
            enc_down.push((resnets, down));
            ch = out;
        }
        let mut dec_up = Vec::new();
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut ch = last;
        for (i, &out) in reversed.iter().enumerate() {
            let block = decoder.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            for l in 0..=c.layers_per_block {
                resnets.push(resnet(s, block.pp("resnets").pp(l), if l == 0 { ch } else { out }, out, c)?);
            }
            let up =
                if i + 1 < reversed.len() { Some(Upsample::new(s, block.pp("upsamplers").pp(0), out)?) } else { None };
            dec_up.push((resnets, up));
            ch = out;
        }
        let lc = c.latent_channels;
        Ok(Self {
            enc_conv_in: Conv2d::new(s, encoder.pp("conv_in"), Conv2dConfig::new(c.in_channels, first, 3))?,
            enc_down,
            enc_mid: MidBlock::new(s, encoder.pp("mid_block"), last, c)?,
            enc_norm_out: GroupNorm::new(s, encoder.pp("conv_norm_out"), last, norm(c))?,
            enc_conv_out: Conv2d::new(s, encoder.pp("conv_out"), Conv2dConfig::new(last, 2 * lc, 3))?,
            quant_conv: c
                .use_quant_conv
                .then(|| Conv2d::new(s, at.pp("quant_conv"), Conv2dConfig::new(2 * lc, 2 * lc, 1)))
                .transpose()?,
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| Conv2d::new(s, at.pp("post_quant_conv"), Conv2dConfig::new(lc, lc, 1)))
                .transpose()?,
            dec_conv_in: Conv2d::new(s, decoder.pp("conv_in"), Conv2dConfig::new(lc, last, 3))?,
            dec_mid: MidBlock::new(s, decoder.pp("mid_block"), last, c)?,
            dec_up,
            dec_norm_out: GroupNorm::new(s, decoder.pp("conv_norm_out"), first, norm(c))?,
            dec_conv_out: Conv2d::new(s, decoder.pp("conv_out"), Conv2dConfig::new(first, c.out_channels, 3))?,
            config: c.clone(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The posterior of `x [n, c_in, H, W]` (values in [−1, 1], sides multiples of the
    /// downscale): `(mean, logvar)`, each `[n, latent, H/f, W/f]`, `logvar` clamped to
    /// [−30, 20] as diffusers does.
    pub fn encode<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<(Var<B>, Var<B>)> {
        let t = p.tape;
        let s = B::shape(&x.value);
        let f = self.config.downscale();
        if s.rank() != 4
            || s.dims()[1] != self.config.in_channels
            || !s.dims()[2].is_multiple_of(f)
            || !s.dims()[3].is_multiple_of(f)
            || s.dims()[2] == 0
            || s.dims()[3] == 0
        {
            return Err(TrainError::Mismatch(format!(
                "VAE input {s}: expected [n, {}, h, w] with sides multiples of {f}",
                self.config.in_channels
            )));
        }
        let mut h = self.enc_conv_in.forward(p, x)?;
        for (resnets, down) in &self.enc_down {
            for r in resnets {
                h = r.forward_with(p, &h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(p, &h)?;
            }
        }
        let h = self.enc_mid.forward(p, &h)?;
        let h = self.enc_conv_out.forward(p, &self.enc_norm_out.forward_silu(p, &h)?)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(p, &h)?,
            None => h,
        };
        let lc = self.config.latent_channels;
        let mean = t.slice_channels(&moments, 0, lc)?;
        let logvar = t.slice_channels(&moments, lc, lc)?;
        // clamp(logvar, −30, 20) on the host: the VAE is frozen and never differentiated.
        let clamped: Vec<f32> = B::to_vec(&logvar.value)?.into_iter().map(|v| v.clamp(-30.0, 20.0)).collect();
        let logvar = t.constant(B::from_slice(
            &clamped,
            &B::shape(&logvar.value),
            B::dtype(&logvar.value),
            &B::device(&logvar.value),
        )?);
        Ok((mean, logvar))
    }

    /// Training latents: `(mean(x) − shift_factor) · scaling_factor`.
    pub fn latents<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (mean, _) = self.encode(p, x)?;
        let shifted = self.shifted(p, &mean, -self.config.shift_factor)?;
        p.tape.scale(&shifted, self.config.scaling_factor)
    }

    /// Images of training latents: `decode(z / scaling_factor + shift_factor)`, as diffusers'
    /// pipelines call it.
    pub fn decode_latents<B: Backend>(&self, p: &Bound<'_, B>, latents: &Var<B>) -> Result<Var<B>> {
        let z = p.tape.scale(latents, 1.0 / self.config.scaling_factor)?;
        self.decode(p, &self.shifted(p, &z, self.config.shift_factor)?)
    }

    /// `x + by` (x itself when `by` is 0, as in SD 1.x/2.x).
    fn shifted<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, by: f32) -> Result<Var<B>> {
        if by == 0.0 {
            return Ok(x.clone());
        }
        let shift = B::full(&Shape::new([1]), by, B::dtype(&x.value), &B::device(&x.value))?;
        p.tape.add(x, &p.tape.constant(shift))
    }

    /// `z [n, latent, h, w]` (unscaled) → images `[n, c_out, f·h, f·w]`, about [−1, 1].
    pub fn decode<B: Backend>(&self, p: &Bound<'_, B>, z: &Var<B>) -> Result<Var<B>> {
        let s = B::shape(&z.value);
        if s.rank() != 4 || s.dims()[1] != self.config.latent_channels {
            return Err(TrainError::Mismatch(format!(
                "latents {s}: expected [n, {}, h, w]",
                self.config.latent_channels
            )));
        }
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(p, z)?,
            None => z.clone(),
        };
        let h = self.dec_conv_in.forward(p, &z)?;
        let mut h = self.dec_mid.forward(p, &h)?;
        for (resnets, up) in &self.dec_up {
            for r in resnets {
                h = r.forward_with(p, &h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(p, &h)?;
            }
        }
        self.dec_conv_out.forward(p, &self.dec_norm_out.forward_silu(p, &h)?)
    }
}

/// diffusers' renaming of the old attention names of VAE checkpoints: `query` → `to_q`,
/// `key` → `to_k`, `value` → `to_v`, `proj_attn` → `to_out.0`.
pub fn modern_attention_name(name: &str) -> String {
    for (old, new) in [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]
    {
        if name.contains(".attentions.") && name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

/// Loads a diffusers VAE folder into `store` under `at` (old attention names renamed,
/// 1×1-conv-shaped attention projections flattened), all-or-nothing.
pub fn load_vae<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, dir: &Path) -> Result<usize> {
    let at = at.into();
    let (file, tensors) = read_diffusers_weights(dir)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, (shape, v))| {
            let name = modern_attention_name(&k);
            // Old checkpoints may hold the projections as [c, c, 1, 1].
            let is_proj = name.contains(".attentions.")
                && [".to_q.", ".to_k.", ".to_v.", ".to_out.0."].iter().any(|p| name.contains(p));
            let shape = if is_proj && shape.rank() == 4 && shape.dims()[2..] == [1, 1] {
                Shape::new(&shape.dims()[..2])
            } else {
                shape
            };
            (at.name(name), (shape, v))
        })
        .collect();
    load_tensors(store, &file, tensors, |n| at.contains(n), |_| false)
}
