use lisa_core::backend::{Backend, GroupNormParams, Shape};

use super::{Conv2d, Conv2dConfig, GroupNorm, Linear};
use crate::autodiff::Var;
use crate::error::Result;
use crate::params::{Bound, ParamStore, Scope};

/// The widths of a [`ResBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResBlockConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding it reads (0: none, as in the VAE).
    pub time_dim: usize,
    /// Its group norms.
    pub norm: GroupNormParams,
}

/// Residual block with time-embedding injection (DDPM / diffusers `ResnetBlock2D`):
/// `h = conv₁(silu(gn₁(x))) + W_t·silu(e_t)`, `out = skip(x) + conv₂(silu(gn₂(h)))`,
/// `skip` a 1×1 conv when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    /// Parameters under `at` with diffusers' names (`norm1`, `conv1`, `time_emb_proj`, …).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: ResBlockConfig) -> Result<Self> {
        let at = at.into();
        let (c_in, c_out) = (c.in_channels, c.out_channels);
        Ok(Self {
            norm1: GroupNorm::new(s, at.pp("norm1"), c_in, c.norm)?,
            conv1: Conv2d::new(s, at.pp("conv1"), Conv2dConfig::new(c_in, c_out, 3))?,
            time_proj: if c.time_dim > 0 {
                Some(Linear::new(s, at.pp("time_emb_proj"), c.time_dim, c_out)?)
            } else {
                None
            },
            norm2: GroupNorm::new(s, at.pp("norm2"), c_out, c.norm)?,
            conv2: Conv2d::new(s, at.pp("conv2"), Conv2dConfig::new(c_out, c_out, 3))?,
            skip: if c_in != c_out {
                Some(Conv2d::new(s, at.pp("conv_shortcut"), Conv2dConfig::new(c_in, c_out, 1))?)
            } else {
                None
            },
        })
    }

    /// `x [n, c_in, h, w]`, `silu_temb [n, t_dim]` (already through SiLU) → `[n, c_out, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, silu_temb: &Var<B>) -> Result<Var<B>> {
        self.forward_with(p, x, Some(silu_temb))
    }

    /// `x [n, c_in, h, w]` → `[n, c_out, h, w]`, with the time embedding when the block reads one.
    pub fn forward_with<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, silu_temb: Option<&Var<B>>) -> Result<Var<B>> {
        let t = p.tape;
        let mut h = self.conv1.forward(p, &self.norm1.forward_silu(p, x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_proj, silu_temb) {
            let e = proj.forward(p, temb)?; // [n, c_out]
            let d = B::shape(&e.value);
            let e = t.reshape(&e, &Shape::new([d.dims()[0], d.dims()[1], 1, 1]))?;
            h = t.add(&h, &e)?;
        }
        let h = self.conv2.forward(p, &self.norm2.forward_silu(p, &h)?)?;
        let skip = match &self.skip {
            Some(c) => c.forward(p, x)?,
            None => x.clone(),
        };
        t.add(&skip, &h)
    }
}

/// Stride-2 3×3 convolution (halves the resolution).
#[derive(Debug, Clone)]
pub struct Downsample(Conv2d);

impl Downsample {
    /// `c → c` channels, the convolution under `at.conv`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: usize) -> Result<Self> {
        Ok(Self(Conv2d::new(s, at.into().pp("conv"), Conv2dConfig::new(c, c, 3).stride(2))?))
    }

    /// `[n, c, h, w] → [n, c, h/2, w/2]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        self.0.forward(p, x)
    }
}

/// Nearest ×2 upsampling followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample(Conv2d);

impl Upsample {
    /// `c → c` channels, the convolution under `at.conv`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: usize) -> Result<Self> {
        Ok(Self(Conv2d::new(s, at.into().pp("conv"), Conv2dConfig::new(c, c, 3))?))
    }

    /// `[n, c, h, w] → [n, c, 2h, 2w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        self.0.forward_upsampled(p, x)
    }
}
