//! The blocks of diffusers' `UNet2DConditionModel` and `ControlNetModel` (SD 1.x/2.x), with
//! diffusers' parameter names: the timestep embedding, the spatial transformer
//! (`Transformer2DModel`), and the down, middle and up blocks.

use lisa_core::backend::{Backend, DType, GroupNormParams, Shape};

use super::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::autodiff::Var;
use crate::error::Result;
use crate::nn::{
    Conv2d, Conv2dConfig, Downsample, GroupNorm, Linear, ResBlock, ResBlockConfig, TransformerBlock, Upsample,
};
use crate::params::{Bound, ParamStore, Scope};

/// diffusers' group-norm ε inside `Transformer2DModel` (whatever `norm_eps` says).
pub const TRANSFORMER_GROUP_NORM_EPS: f32 = 1e-6;

/// diffusers' `get_timestep_embedding` in `f32`: `ωᵢ = exp(−ln(10⁴)·i/(half − shift))`,
/// `e = [sin(t·ω), cos(t·ω)]`, halves swapped when `flip_sin_to_cos`. Returns `[n, dim]`.
pub fn timestep_embedding(t: &[f32], dim: usize, flip_sin_to_cos: bool, freq_shift: usize) -> Vec<f32> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let ln = 10000f64.ln() as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((-ln * i as f32) / denom).exp()).collect();
    let mut out = vec![0.0f32; t.len() * dim];
    for (row, &tb) in out.chunks_mut(dim).zip(t) {
        for (i, &w) in freqs.iter().enumerate() {
            let arg = tb * w;
            let (sin, cos) = (arg.sin(), arg.cos());
            let (first, second) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
            row[i] = first;
            row[half + i] = second;
        }
    }
    out
}

/// `time_embedding.linear_{1,2}` over the sinusoid of width `block_out_channels[0]`.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    sinusoid_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: usize,
}

impl TimeEmbedding {
    /// `linear_{1,2}` under `at` (`…time_embedding`), width `4·block_out_channels[0]`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &UNetConfig) -> Result<Self> {
        let at = at.into();
        let dim = c.block_out_channels[0];
        Ok(Self {
            linear_1: Linear::new(s, at.pp("linear_1"), dim, 4 * dim)?,
            linear_2: Linear::new(s, at.pp("linear_2"), 4 * dim, 4 * dim)?,
            sinusoid_dim: dim,
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
        })
    }

    /// `silu(linear_2(silu(linear_1(sin(t)))) + aug)` `[n, 4·c₀]`: what every resnet reads
    /// (SiLU applied once here instead of in each resnet); `aug` is SDXL's added embedding.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        t: &[f32],
        aug: Option<&Var<B>>,
        device: &B::Device,
    ) -> Result<Var<B>> {
        let tape = p.tape;
        let sin = timestep_embedding(t, self.sinusoid_dim, self.flip_sin_to_cos, self.freq_shift);
        let sin = B::from_slice(&sin, &Shape::new([t.len(), self.sinusoid_dim]), DType::F32, device)?;
        let h = tape.silu(&self.linear_1.forward(p, &tape.constant(sin))?)?;
        let emb = self.linear_2.forward(p, &h)?;
        let emb = match aug {
            Some(aug) => tape.add(&emb, aug)?,
            None => emb,
        };
        tape.silu(&emb)
    }
}

/// A projection in or out of the transformer: a 1×1 conv (SD 1.x) or a linear layer (SD 2.x).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: `x + proj_out(blocks(proj_in(gn(x))))` over
/// the `h·w` tokens of `x [b, c, h, w]`, cross-attending to the text context.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    /// `{norm,proj_in,transformer_blocks.{0..layers},proj_out}` under `at` over
    /// `c = heads·head_dim` channels.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        (c, heads, layers): (usize, usize, usize),
        u: &UNetConfig,
    ) -> Result<Self> {
        let at = at.into();
        let proj = |s: &mut ParamStore<B>, which: &str| -> Result<Projection> {
            let at = at.pp(which);
            Ok(if u.use_linear_projection {
                Projection::Linear(Linear::new(s, at, c, c)?)
            } else {
                Projection::Conv(Conv2d::new(s, at, Conv2dConfig::new(c, c, 1))?)
            })
        };
        let norm = GroupNormParams { groups: u.norm_num_groups, eps: TRANSFORMER_GROUP_NORM_EPS };
        Ok(Self {
            norm: GroupNorm::new(s, at.pp("norm"), c, norm)?,
            proj_in: proj(s, "proj_in")?,
            blocks: (0..layers)
                .map(|l| TransformerBlock::new(s, at.pp("transformer_blocks").pp(l), c, heads, u.cross_attention_dim))
                .collect::<Result<Vec<_>>>()?,
            proj_out: proj(s, "proj_out")?,
        })
    }

    /// `x [b, c, h, w]`, `context [b, s, d_ctx]` → `[b, c, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, context: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let s = B::shape(&x.value);
        let (b, c, h, w) = (s.dims()[0], s.dims()[1], s.dims()[2], s.dims()[3]);
        let to_tokens = |v: &Var<B>| -> Result<Var<B>> {
            // [b, c, h, w] → [b, h, w, c] → [b, h·w, c]
            t.reshape(&t.permute(v, &[0, 2, 3, 1])?, &Shape::new([b, h * w, c]))
        };
        let to_image = |v: &Var<B>| -> Result<Var<B>> {
            // [b, h·w, c] → [b, h, w, c] → [b, c, h, w]
            t.permute(&t.reshape(v, &Shape::new([b, h, w, c]))?, &[0, 3, 1, 2])
        };
        let blocks = |mut tokens: Var<B>| -> Result<Var<B>> {
            for block in &self.blocks {
                tokens = block.forward(p, &tokens, context)?;
            }
            Ok(tokens)
        };
        let normed = self.norm.forward(p, x)?;
        let out = match (&self.proj_in, &self.proj_out) {
            (Projection::Conv(pi), Projection::Conv(po)) => {
                let tokens = to_tokens(&pi.forward(p, &normed)?)?;
                po.forward(p, &to_image(&blocks(tokens)?)?)?
            }
            (Projection::Linear(pi), Projection::Linear(po)) => {
                let tokens = pi.forward(p, &to_tokens(&normed)?)?;
                to_image(&po.forward(p, &blocks(tokens)?)?)?
            }
            _ => unreachable!("both projections are built alike"),
        };
        t.add(&out, x)
    }
}

fn resnet<B: Backend>(s: &mut ParamStore<B>, at: Scope, c_in: usize, c_out: usize, u: &UNetConfig) -> Result<ResBlock> {
    let norm = GroupNormParams { groups: u.norm_num_groups, eps: u.norm_eps };
    ResBlock::new(
        s,
        at,
        ResBlockConfig { in_channels: c_in, out_channels: c_out, time_dim: 4 * u.block_out_channels[0], norm },
    )
}

/// A down block (`CrossAttnDownBlock2D` or `DownBlock2D`): `layers_per_block` resnets (each
/// followed by a transformer in the cross-attention kind), then a stride-2 conv unless last.
/// Every resnet(+transformer) output and the downsampled output are skips.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    /// Level `i` of `u` under `at` (`…down_blocks.{i}`), reading `c_in` channels.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        i: usize,
        c_in: usize,
        u: &UNetConfig,
    ) -> Result<Self> {
        let at = at.into();
        let c = u.block_out_channels[i];
        let mut block = Self { resnets: Vec::new(), attentions: Vec::new(), downsampler: None };
        for l in 0..u.layers_per_block {
            block.resnets.push(resnet(s, at.pp("resnets").pp(l), if l == 0 { c_in } else { c }, c, u)?);
            if u.down_block_types[i] == DownBlockType::CrossAttnDownBlock2D {
                block.attentions.push(SpatialTransformer::new(
                    s,
                    at.pp("attentions").pp(l),
                    (c, u.heads[i], u.transformer_layers_at(i)),
                    u,
                )?);
            }
        }
        if i + 1 < u.block_out_channels.len() {
            block.downsampler = Some(Downsample::new(s, at.pp("downsamplers").pp(0), c)?);
        }
        Ok(block)
    }

    /// `x` → the block's output, pushing every skip onto `skips`.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        temb: &Var<B>,
        context: &Var<B>,
        skips: &mut Vec<Var<B>>,
    ) -> Result<Var<B>> {
        let mut h = x.clone();
        for (l, r) in self.resnets.iter().enumerate() {
            h = r.forward(p, &h, temb)?;
            if let Some(a) = self.attentions.get(l) {
                h = a.forward(p, &h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(p, &h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer (the last level's head count), resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_0: ResBlock,
    attention: SpatialTransformer,
    resnet_1: ResBlock,
}

impl MidBlock {
    /// `{resnets.0, attentions.0, resnets.1}` under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, u: &UNetConfig) -> Result<Self> {
        let at = at.into();
        let c = *u.block_out_channels.last().expect("validated non-empty");
        let heads = *u.heads.last().expect("validated non-empty");
        Ok(Self {
            resnet_0: resnet(s, at.pp("resnets").pp(0), c, c, u)?,
            attention: SpatialTransformer::new(
                s,
                at.pp("attentions").pp(0),
                (c, heads, u.transformer_layers_at(u.block_out_channels.len() - 1)),
                u,
            )?,
            resnet_1: resnet(s, at.pp("resnets").pp(1), c, c, u)?,
        })
    }

    /// `[b, c, h, w] → [b, c, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, temb: &Var<B>, context: &Var<B>) -> Result<Var<B>> {
        let h = self.resnet_0.forward(p, x, temb)?;
        let h = self.attention.forward(p, &h, context)?;
        self.resnet_1.forward(p, &h, temb)
    }
}

/// An up block (`CrossAttnUpBlock2D` or `UpBlock2D`): `layers_per_block + 1` resnets over
/// `[h, skip]` (skips taken from the end), each followed by a transformer in the
/// cross-attention kind, then nearest ×2 and a 3×3 conv unless last.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    /// Up level `i` (from the deepest) under `at` (`…up_blocks.{i}`).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, i: usize, u: &UNetConfig) -> Result<Self> {
        let at = at.into();
        let n = u.block_out_channels.len();
        let rev = |k: usize| u.block_out_channels[n - 1 - k.min(n - 1)];
        let (prev, out, input) = (rev(i.saturating_sub(1)), rev(i), rev(i + 1));
        let prev = if i == 0 { out } else { prev };
        let heads = u.heads[n - 1 - i];
        let layers = u.layers_per_block + 1;
        let mut block = Self { resnets: Vec::new(), attentions: Vec::new(), upsampler: None };
        for l in 0..layers {
            let skip = if l == layers - 1 { input } else { out };
            let c_in = if l == 0 { prev } else { out };
            block.resnets.push(resnet(s, at.pp("resnets").pp(l), c_in + skip, out, u)?);
            if u.up_block_types[i] == UpBlockType::CrossAttnUpBlock2D {
                block.attentions.push(SpatialTransformer::new(
                    s,
                    at.pp("attentions").pp(l),
                    (out, heads, u.transformer_layers_at(n - 1 - i)),
                    u,
                )?);
            }
        }
        if i + 1 < n {
            block.upsampler = Some(Upsample::new(s, at.pp("upsamplers").pp(0), out)?);
        }
        Ok(block)
    }

    /// The number of skips it consumes.
    pub fn skips(&self) -> usize {
        self.resnets.len()
    }

    /// `x` and this block's skips (in encoder order; consumed from the last) → its output.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        skips: &[Var<B>],
        temb: &Var<B>,
        context: &Var<B>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let mut h = x.clone();
        for (l, (r, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = r.forward(p, &t.concat_channels(&[&h, skip])?, temb)?;
            if let Some(a) = self.attentions.get(l) {
                h = a.forward(p, &h, context)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(p, &h)?;
        }
        Ok(h)
    }
}
