//! Transformer layers with diffusers' names: multi-head attention (`to_q`, `to_k`, `to_v`,
//! `to_out.0`), the GEGLU feed-forward (`net.0.proj`, `net.2`) and the basic transformer
//! block (`norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff`).

use lisa_core::backend::{Backend, Shape, UnaryOp};

use super::{LayerNorm, Linear};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, ParamStore};

/// Multi-head scaled dot-product attention (diffusers `Attention`, no biases on q/k/v):
/// `out = W_o·concat_h(softmax(Q_h·K_hᵀ/√d_h)·V_h) + b_o`, `Q = x·W_q`, `K, V = ctx·W_{k,v}`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl MultiHeadAttention {
    /// `heads` heads of `head_dim` over queries of `query_dim` features and a context of
    /// `context_dim` (self-attention: `context_dim = query_dim`).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        name: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if heads == 0 || head_dim == 0 {
            return Err(TrainError::Config(format!("{name}: attention needs heads > 0 and head_dim > 0")));
        }
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::without_bias(s, &format!("{name}.to_q"), query_dim, inner)?,
            to_k: Linear::without_bias(s, &format!("{name}.to_k"), context_dim, inner)?,
            to_v: Linear::without_bias(s, &format!("{name}.to_v"), context_dim, inner)?,
            to_out: Linear::new(s, &format!("{name}.to_out.0"), inner, query_dim)?,
            heads,
            head_dim,
        })
    }

    /// `x [b, t, query_dim]`, `context [b, s, context_dim]` (None: self-attention) →
    /// `[b, t, query_dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, context: Option<&Var<B>>) -> Result<Var<B>> {
        let t = p.tape;
        let ctx = context.unwrap_or(x);
        let (b, tq) = (B::shape(&x.value).dims()[0], B::shape(&x.value).dims()[1]);
        let tk = B::shape(&ctx.value).dims()[1];
        let (h, d) = (self.heads, self.head_dim);
        // [b, t, h·d] → [b, h, t, d] → [b·h, t, d]
        let split = |v: &Var<B>, len: usize| -> Result<Var<B>> {
            let v = t.reshape(v, &Shape::new([b, len, h, d]))?;
            t.reshape(&t.permute(&v, &[0, 2, 1, 3])?, &Shape::new([b * h, len, d]))
        };
        let q = split(&self.to_q.forward(p, x)?, tq)?;
        let k = split(&self.to_k.forward(p, ctx)?, tk)?;
        let v = split(&self.to_v.forward(p, ctx)?, tk)?;
        let o = t.attention(&q, &k, &v, 1.0 / (d as f32).sqrt())?; // [b·h, t, d]
        let o = t.permute(&t.reshape(&o, &Shape::new([b, h, tq, d]))?, &[0, 2, 1, 3])?; // [b, t, h, d]
        self.to_out.forward(p, &t.reshape(&o, &Shape::new([b, tq, h * d]))?)
    }
}

/// The GEGLU feed-forward (diffusers `FeedForward(activation_fn="geglu")`):
/// `[h, gate] = x·W₀ + b₀` (split in halves), `out = (h ⊙ gelu(gate))·W₂ + b₂`.
#[derive(Debug, Clone)]
pub struct GegluFeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl GegluFeedForward {
    /// `dim → 2·inner → dim` (`inner = 4·dim` in SD).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, name: &str, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj: Linear::new(s, &format!("{name}.net.0.proj"), dim, 2 * inner)?,
            out: Linear::new(s, &format!("{name}.net.2"), inner, dim)?,
            inner,
        })
    }

    /// `[.., dim] → [.., dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let hg = self.proj.forward(p, x)?;
        let last = B::shape(&hg.value).rank() - 1;
        let h = t.narrow(&hg, last, 0, self.inner)?;
        let gate = t.unary(UnaryOp::Gelu, &t.narrow(&hg, last, self.inner, self.inner)?)?;
        self.out.forward(p, &t.mul(&h, &gate)?)
    }
}

/// The pre-norm transformer block of SD (diffusers `BasicTransformerBlock`, layer norms):
/// `h += attn1(ln1(h))`, `h += attn2(ln2(h), ctx)`, `h += ff(ln3(h))`.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: MultiHeadAttention,
    norm2: LayerNorm,
    attn2: MultiHeadAttention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
}

/// diffusers' layer-norm ε in `BasicTransformerBlock`.
pub const TRANSFORMER_NORM_EPS: f32 = 1e-5;

impl TransformerBlock {
    /// Over `dim = heads·head_dim` features with a cross-attention context of `context_dim`.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        name: &str,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let head_dim = dim / heads.max(1);
        let eps = TRANSFORMER_NORM_EPS;
        Ok(Self {
            norm1: LayerNorm::new(s, &format!("{name}.norm1"), dim, eps)?,
            attn1: MultiHeadAttention::new(s, &format!("{name}.attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::new(s, &format!("{name}.norm2"), dim, eps)?,
            attn2: MultiHeadAttention::new(s, &format!("{name}.attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::new(s, &format!("{name}.norm3"), dim, eps)?,
            ff: GegluFeedForward::new(s, &format!("{name}.ff"), dim, 4 * dim)?,
        })
    }

    /// `x [b, t, dim]`, `context [b, s, context_dim]` → `[b, t, dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, context: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let h = t.add(&self.attn1.forward(p, &self.norm1.forward(p, x)?, None)?, x)?;
        let h = t.add(&self.attn2.forward(p, &self.norm2.forward(p, &h)?, Some(context))?, &h)?;
        t.add(&self.ff.forward(p, &self.norm3.forward(p, &h)?)?, &h)
    }
}
