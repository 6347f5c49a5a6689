use lisa_core::backend::{Backend, Shape};

use super::{Conv2d, GroupNorm, Linear};
use crate::autodiff::Var;
use crate::error::Result;
use crate::params::{Bound, ParamStore};

/// Residual block with time-embedding injection (DDPM / diffusers `ResnetBlock2D`):
/// `h = conv₁(silu(gn₁(x))) + W_t·silu(e_t)`, `out = skip(x) + conv₂(silu(gn₂(h)))`,
/// `skip` a 1×1 conv when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    /// `c_in → c_out` channels, time embedding of width `t_dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        name: &str,
        c_in: usize,
        c_out: usize,
        t_dim: usize,
        groups: usize,
        eps: f32,
        trainable: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(s, &format!("{name}.norm1"), c_in, groups, eps, trainable)?,
            conv1: Conv2d::new(s, &format!("{name}.conv1"), c_in, c_out, 3, 1, false, trainable)?,
            time_proj: Linear::new(s, &format!("{name}.time_emb_proj"), t_dim, c_out, trainable)?,
            norm2: GroupNorm::new(s, &format!("{name}.norm2"), c_out, groups, eps, trainable)?,
            conv2: Conv2d::new(s, &format!("{name}.conv2"), c_out, c_out, 3, 1, false, trainable)?,
            skip: if c_in != c_out {
                Some(Conv2d::new(s, &format!("{name}.conv_shortcut"), c_in, c_out, 1, 1, false, trainable)?)
            } else {
                None
            },
        })
    }

    /// `x [n, c_in, h, w]`, `silu_temb [n, t_dim]` (already through SiLU) → `[n, c_out, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, silu_temb: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let h = self.conv1.forward(p, &t.silu(&self.norm1.forward(p, x)?)?)?;
        let e = self.time_proj.forward(p, silu_temb)?; // [n, c_out]
        let d = B::shape(&e.value);
        let e = t.reshape(&e, &Shape::new([d.dims()[0], d.dims()[1], 1, 1]))?;
        let h = t.add(&h, &e)?;
        let h = self.conv2.forward(p, &t.silu(&self.norm2.forward(p, &h)?)?)?;
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
    /// `c → c` channels.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, name: &str, c: usize, trainable: bool) -> Result<Self> {
        Ok(Self(Conv2d::new(s, &format!("{name}.conv"), c, c, 3, 2, false, trainable)?))
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
    /// `c → c` channels.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, name: &str, c: usize, trainable: bool) -> Result<Self> {
        Ok(Self(Conv2d::new(s, &format!("{name}.conv"), c, c, 3, 1, false, trainable)?))
    }

    /// `[n, c, h, w] → [n, c, 2h, 2w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        self.0.forward(p, &p.tape.upsample(x, 2)?)
    }
}
