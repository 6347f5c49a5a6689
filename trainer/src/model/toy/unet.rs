//! The main (prior) UNet: encoder + middle, and the up path that consumes the skips.

use lisa_core::backend::{Backend, DType, Shape};

use super::config::UNetConfig;
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, PromptEmbedding, Residuals, Skips};
use crate::nn::{
    ClassEmbedding, Conv2d, Conv2dConfig, Downsample, GroupNorm, Linear, ResBlock, SelfAttention, Upsample,
    sinusoidal_embedding,
};
use crate::params::{Bound, ParamStore, Scope};

/// Time MLP (sinusoid → Linear → SiLU → Linear) plus the prompt embeddings, summed.
#[derive(Debug, Clone)]
pub struct TimeEmbedding {
    lin1: Linear,
    lin2: Linear,
    prompts: Vec<ClassEmbedding>,
    sin_dim: usize,
}

impl TimeEmbedding {
    /// Parameters under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &UNetConfig) -> Result<Self> {
        let at = at.into();
        Ok(Self {
            lin1: Linear::new(s, at.pp("linear_1"), c.time_sinusoidal_dim, c.time_dim)?,
            lin2: Linear::new(s, at.pp("linear_2"), c.time_dim, c.time_dim)?,
            prompts: c
                .prompt_classes
                .iter()
                .enumerate()
                .map(|(i, &k)| ClassEmbedding::new(s, at.pp(format!("prompt_{i}")), k, c.time_dim))
                .collect::<Result<_>>()?,
            sin_dim: c.time_sinusoidal_dim,
        })
    }

    /// `silu(e_t + Σ_k emb_k(id_k))`, `[n, time_dim]` (every consumer applies SiLU first).
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, cond: &Conditioning) -> Result<Var<B>> {
        let t = p.tape;
        let PromptEmbedding::Classes(ids) = &cond.prompt else {
            return Err(TrainError::Mismatch("the toy model reads class ids, not text embeddings".into()));
        };
        if ids.len() != self.prompts.len() || ids.iter().any(|ids| ids.len() != cond.t.len()) {
            return Err(TrainError::Mismatch(format!(
                "conditioning needs {} prompt id lists of {} ids each",
                self.prompts.len(),
                cond.t.len()
            )));
        }
        let n = cond.t.len();
        let device = B::device(&p.p(self.lin1.weight).value);
        let sin = B::from_slice(
            &sinusoidal_embedding(&cond.t, self.sin_dim),
            &Shape::new([n, self.sin_dim]),
            DType::F32,
            &device,
        )?;
        let mut e = self.lin2.forward(p, &t.silu(&self.lin1.forward(p, &t.constant(sin))?)?)?;
        for (emb, ids) in self.prompts.iter().zip(ids) {
            e = t.add(&e, &emb.forward(p, ids)?)?;
        }
        t.silu(&e)
    }
}

/// conv_in, one ResBlock per level with a stride-2 conv between levels, and the middle block.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    levels: Vec<(ResBlock, Option<Downsample>)>,
    mid: ResBlock,
    attention: Option<SelfAttention>,
}

impl Encoder {
    /// Parameters under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &UNetConfig) -> Result<Self> {
        let at = at.into();
        let mut levels = Vec::new();
        let mut prev = c.channels[0];
        for (i, &ch) in c.channels.iter().enumerate() {
            let level = at.pp("down").pp(i);
            let res = ResBlock::new(s, level.pp("res"), c.res_block(prev, ch))?;
            let down =
                if i + 1 < c.channels.len() { Some(Downsample::new(s, level.pp("downsample"), ch)?) } else { None };
            levels.push((res, down));
            prev = ch;
        }
        Ok(Self {
            conv_in: Conv2d::new(s, at.pp("conv_in"), Conv2dConfig::new(c.image_channels, c.channels[0], 3))?,
            levels,
            mid: ResBlock::new(s, at.pp("mid").pp("res"), c.res_block(prev, prev))?,
            attention: if c.attention {
                Some(SelfAttention::new(s, at.pp("mid").pp("attention"), prev, c.norm())?)
            } else {
                None
            },
        })
    }

    /// `x [n, c_img, r, r]` → level outputs and middle; `after_conv_in` (the ControlNet hint)
    /// is added to conv_in's output.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        silu_temb: &Var<B>,
        after_conv_in: Option<&Var<B>>,
    ) -> Result<Skips<B>> {
        let t = p.tape;
        let mut h = self.conv_in.forward(p, x)?;
        if let Some(hint) = after_conv_in {
            h = t.add(&h, hint)?;
        }
        let mut levels = Vec::with_capacity(self.levels.len());
        for (res, down) in &self.levels {
            h = res.forward(p, &h, silu_temb)?;
            levels.push(h.clone());
            if let Some(d) = down {
                h = d.forward(p, &h)?;
            }
        }
        let mut mid = self.mid.forward(p, &h, silu_temb)?;
        if let Some(a) = &self.attention {
            mid = a.forward(p, &mid)?;
        }
        Ok(Skips::unet(levels, mid))
    }
}

/// The main UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    /// Its configuration.
    pub config: UNetConfig,
    /// Time + prompt embedding.
    pub time: TimeEmbedding,
    /// Encoder and middle block.
    pub encoder: Encoder,
    up: Vec<(ResBlock, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Parameters under `at` (the main model is `main`, frozen during control training).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &UNetConfig) -> Result<Self> {
        let at = at.into();
        c.validate()?;
        let time = TimeEmbedding::new(s, at.pp("time"), c)?;
        let encoder = Encoder::new(s, at.pp("encoder"), c)?;
        // Up path, deepest level first: ResBlock on concat(h, skip_i), then ×2 up + conv.
        let mut up = Vec::new();
        let mut prev = *c.channels.last().unwrap_or(&0);
        for i in (0..c.channels.len()).rev() {
            let ch = c.channels[i];
            let level = at.pp("up").pp(i);
            let res = ResBlock::new(s, level.pp("res"), c.res_block(prev + ch, ch))?;
            let upsample = if i > 0 { Some(Upsample::new(s, level.pp("upsample"), ch)?) } else { None };
            up.push((res, upsample));
            prev = ch;
        }
        Ok(Self {
            config: c.clone(),
            time,
            encoder,
            up,
            norm_out: GroupNorm::new(s, at.pp("norm_out"), c.channels[0], c.norm())?,
            conv_out: Conv2d::new(s, at.pp("conv_out"), Conv2dConfig::new(c.channels[0], c.image_channels, 3))?,
        })
    }

    /// The up path over `enc`, with the side residuals (times `scale`) added to the middle
    /// output and to every skip when given: the only place the side network enters the main
    /// network (docs/method.md §5).
    pub fn decode<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        enc: &Skips<B>,
        residuals: Option<(&Residuals<B>, f32)>,
        silu_temb: &Var<B>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let with = |x: &Var<B>, r: Option<&Var<B>>, scale: f32| -> Result<Var<B>> {
            match r {
                Some(r) => t.add(x, &if scale == 1.0 { r.clone() } else { t.scale(r, scale)? }),
                None => Ok(x.clone()),
            }
        };
        let scale = residuals.map_or(1.0, |(_, s)| s);
        let mut h = with(enc.mid()?, residuals.map(|(r, _)| r.mid()).transpose()?, scale)?;
        let levels = enc.down.len();
        for (j, (res, upsample)) in self.up.iter().enumerate() {
            let i = levels - 1 - j;
            let skip = with(&enc.down[i], residuals.map(|(r, _)| &r.down[i]), scale)?;
            h = res.forward(p, &t.concat_channels(&[&h, &skip])?, silu_temb)?;
            if let Some(u) = upsample {
                h = u.forward(p, &h)?;
            }
        }
        self.conv_out.forward(p, &self.norm_out.forward_silu(p, &h)?)
    }
}
