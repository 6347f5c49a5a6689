use lisa_core::backend::{Backend, GroupNormParams, Shape, Transpose};

use super::{Conv2d, Conv2dConfig, GroupNorm};
use crate::autodiff::Var;
use crate::error::Result;
use crate::params::{Bound, ParamStore, Scope};

/// Single-head spatial self-attention with a residual (DDPM's `AttnBlock`):
/// `q, k, v = 1×1 convs of gn(x)`, `A = softmax(qᵀk/√c)`, `out = x + proj(v·Aᵀ)`.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj: Conv2d,
    channels: usize,
}

impl SelfAttention {
    /// Over `c` channels, parameters under `at` (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out`).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: usize,
        norm: GroupNormParams,
    ) -> Result<Self> {
        let at = at.into();
        let one_by_one = Conv2dConfig::new(c, c, 1);
        Ok(Self {
            norm: GroupNorm::new(s, at.pp("group_norm"), c, norm)?,
            q: Conv2d::new(s, at.pp("to_q"), one_by_one)?,
            k: Conv2d::new(s, at.pp("to_k"), one_by_one)?,
            v: Conv2d::new(s, at.pp("to_v"), one_by_one)?,
            proj: Conv2d::new(s, at.pp("to_out"), one_by_one)?,
            channels: c,
        })
    }

    /// `[n, c, h, w] → [n, c, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let s = B::shape(&x.value);
        let (n, c, hw) = (s.dims()[0], s.dims()[1], s.dims()[2] * s.dims()[3]);
        let flat = Shape::new([n, c, hw]);
        let h = self.norm.forward(p, x)?;
        let q = t.reshape(&self.q.forward(p, &h)?, &flat)?;
        let k = t.reshape(&self.k.forward(p, &h)?, &flat)?;
        let v = t.reshape(&self.v.forward(p, &h)?, &flat)?;
        let scores = t.matmul(&q, &k, Transpose { a: true, b: false })?; // [n, hw, hw]
        let attn = t.softmax_last(&t.scale(&scores, 1.0 / (self.channels as f32).sqrt())?)?;
        let out = t.matmul(&v, &attn, Transpose { a: false, b: true })?; // [n, c, hw]
        let out = self.proj.forward(p, &t.reshape(&out, &s)?)?;
        t.add(x, &out)
    }
}
