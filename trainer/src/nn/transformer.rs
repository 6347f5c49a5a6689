//! Transformer layers with diffusers' names: multi-head attention (`to_q`, `to_k`, `to_v`,
//! `to_out.0`), the GEGLU feed-forward (`net.0.proj`, `net.2`) and the basic transformer
//! block (`norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff`).

use lisa_core::backend::{AttentionParams, Backend, Shape, UnaryOp};

use super::{LayerNorm, Linear};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, ParamStore, Scope};

/// The parameter names and biases of an attention layer's projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionNames {
    /// Query projection (`to_q`, `q_proj`).
    pub q: &'static str,
    /// Key projection.
    pub k: &'static str,
    /// Value projection.
    pub v: &'static str,
    /// Output projection (`to_out.0`, `out_proj`).
    pub out: &'static str,
    /// Whether q, k and v have biases (the output projection always has one).
    pub qkv_bias: bool,
}

/// diffusers' `Attention` in UNet transformer blocks: no q/k/v biases.
pub const DIFFUSERS_ATTENTION: AttentionNames =
    AttentionNames { q: "to_q", k: "to_k", v: "to_v", out: "to_out.0", qkv_bias: false };
/// diffusers' `Attention` in the VAE's middle block: q/k/v with biases.
pub const VAE_ATTENTION: AttentionNames = AttentionNames { qkv_bias: true, ..DIFFUSERS_ATTENTION };
/// transformers' `CLIPAttention`: `q_proj`, `k_proj`, `v_proj`, `out_proj`, all with biases.
pub const CLIP_ATTENTION: AttentionNames =
    AttentionNames { q: "q_proj", k: "k_proj", v: "v_proj", out: "out_proj", qkv_bias: true };

/// The sizes and kind of a [`MultiHeadAttention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Width of the queries (and of the output).
    pub query_dim: usize,
    /// Width of the context (= `query_dim` for self-attention).
    pub context_dim: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Parameter names.
    pub names: AttentionNames,
    /// Query `i` sees keys `j ≤ i` only (text encoders).
    pub causal: bool,
}

impl AttentionConfig {
    /// diffusers' non-causal attention of `heads` heads over `query_dim` (`head_dim =
    /// query_dim / heads`) reading a context of `context_dim`.
    pub fn diffusers(query_dim: usize, context_dim: usize, heads: usize) -> Self {
        let head_dim = query_dim / heads.max(1);
        Self { query_dim, context_dim, heads, head_dim, names: DIFFUSERS_ATTENTION, causal: false }
    }
}

/// Multi-head scaled dot-product attention:
/// `out = W_o·concat_h(softmax(Q_h·K_hᵀ/√d_h + M)·V_h) + b_o`, `Q = x·W_q (+ b_q)`,
/// `K, V = ctx·W_{k,v} (+ b)`, `M` the causal mask when configured.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    causal: bool,
}

impl MultiHeadAttention {
    /// Parameters `{q,k,v,out}` under `at`, named as `c.names` says.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: AttentionConfig) -> Result<Self> {
        let at = at.into();
        if c.heads == 0 || c.head_dim == 0 {
            return Err(TrainError::Config(format!("{at}: attention needs heads > 0 and head_dim > 0")));
        }
        let inner = c.heads * c.head_dim;
        let proj = |s: &mut ParamStore<B>, which: &str, d_in: usize| -> Result<Linear> {
            let at = at.pp(which);
            if c.names.qkv_bias { Linear::new(s, at, d_in, inner) } else { Linear::without_bias(s, at, d_in, inner) }
        };
        Ok(Self {
            to_q: proj(s, c.names.q, c.query_dim)?,
            to_k: proj(s, c.names.k, c.context_dim)?,
            to_v: proj(s, c.names.v, c.context_dim)?,
            to_out: Linear::new(s, at.pp(c.names.out), inner, c.query_dim)?,
            heads: c.heads,
            head_dim: c.head_dim,
            causal: c.causal,
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
        let params = AttentionParams { causal: self.causal, ..AttentionParams::new(d) };
        let o = t.attention(&q, &k, &v, params)?; // [b·h, t, d]
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
    /// `dim → 2·inner → dim` (`inner = 4·dim` in SD), parameters `net.0.proj`, `net.2` under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, dim: usize, inner: usize) -> Result<Self> {
        let net = at.into().pp("net");
        Ok(Self {
            proj: Linear::new(s, net.pp(0).pp("proj"), dim, 2 * inner)?,
            out: Linear::new(s, net.pp(2), inner, dim)?,
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
    /// Over `dim = heads·head_dim` features with a cross-attention context of `context_dim`,
    /// parameters under `at`.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let at = at.into();
        let eps = TRANSFORMER_NORM_EPS;
        Ok(Self {
            norm1: LayerNorm::new(s, at.pp("norm1"), dim, eps)?,
            attn1: MultiHeadAttention::new(s, at.pp("attn1"), AttentionConfig::diffusers(dim, dim, heads))?,
            norm2: LayerNorm::new(s, at.pp("norm2"), dim, eps)?,
            attn2: MultiHeadAttention::new(s, at.pp("attn2"), AttentionConfig::diffusers(dim, context_dim, heads))?,
            norm3: LayerNorm::new(s, at.pp("norm3"), dim, eps)?,
            ff: GegluFeedForward::new(s, at.pp("ff"), dim, 4 * dim)?,
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
