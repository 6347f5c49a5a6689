//! The MMDiT joint transformer block of SD3 (diffusers' `JointTransformerBlock`) and its
//! parts: adaLN-Zero modulation, the joint attention of image and text tokens (with SD3.5's
//! RMS query/key norm and second, image-only attention, and Flux's rotary positions), the
//! tanh-GELU feed-forward. Flux's double-stream block (`FluxTransformerBlock`) is this block
//! with RMS query/key norms and rotary positions.

use lisa_core::backend::{AttentionParams, Backend, Shape, UnaryOp};

use super::config::QkNorm;
use crate::autodiff::Var;
use crate::error::Result;
use crate::nn::{Linear, RmsNorm, Rotary};
use crate::params::{Bound, ParamStore, Scope};

/// The ε of every layer norm and RMS norm in the block (diffusers' `eps=1e-6`).
pub const SD3_NORM_EPS: f32 = 1e-6;

/// `(x − mean)/√(var + ε)` over the last dim, no affine (`elementwise_affine=False`).
pub fn plain_layer_norm<B: Backend>(p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
    let t = p.tape;
    let (device, dtype) = (B::device(&x.value), B::dtype(&x.value));
    let d = *B::shape(&x.value).dims().last().unwrap_or(&1);
    let ones = t.constant(B::full(&Shape::new([d]), 1.0, dtype, &device)?);
    let zeros = t.constant(B::full(&Shape::new([d]), 0.0, dtype, &device)?);
    t.layer_norm(x, &ones, &zeros, SD3_NORM_EPS)
}

/// `x·(1 + scale) + shift` with `x [b, n, d]`, `scale`, `shift [b, d]` (per sample).
pub fn modulate<B: Backend>(p: &Bound<'_, B>, x: &Var<B>, shift: &Var<B>, scale: &Var<B>) -> Result<Var<B>> {
    let t = p.tape;
    let per_sample = |v: &Var<B>| {
        let d = B::shape(&v.value).dims().to_vec();
        t.reshape(v, &Shape::new([d[0], 1, d[1]]))
    };
    let scaled = t.mul(x, &per_sample(scale)?)?;
    t.add(&t.add(x, &scaled)?, &per_sample(shift)?)
}

/// `gate[:, None] · x`.
pub fn gated<B: Backend>(p: &Bound<'_, B>, gate: &Var<B>, x: &Var<B>) -> Result<Var<B>> {
    let d = B::shape(&gate.value).dims().to_vec();
    p.tape.mul(x, &p.tape.reshape(gate, &Shape::new([d[0], 1, d[1]]))?)
}

/// adaLN-Zero's projection `linear(silu(temb))`, split into `chunks` `[b, d]` pieces
/// (`AdaLayerNormZero`: 6; SD3.5's `SD35AdaLayerNormZeroX`: 9; `AdaLayerNormContinuous`: 2).
#[derive(Debug, Clone)]
pub struct Modulation {
    linear: Linear,
    chunks: usize,
}

impl Modulation {
    /// `linear` under `at`: `d → chunks·d`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, d: usize, chunks: usize) -> Result<Self> {
        Ok(Self { linear: Linear::new(s, at.into().pp("linear"), d, chunks * d)?, chunks })
    }

    /// `silu_temb [b, d]` (`silu(temb)`, shared by every block) → the chunks in diffusers' order.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, silu_temb: &Var<B>) -> Result<Vec<Var<B>>> {
        let e = self.linear.forward(p, silu_temb)?;
        let d = B::shape(&e.value).dims()[1] / self.chunks;
        (0..self.chunks).map(|i| p.tape.narrow(&e, 1, i * d, d)).collect()
    }
}

/// The projections of one attention stream: `q`, `k`, `v` (with their RMS norms under
/// `qk_norm`) and the output projection.
#[derive(Debug, Clone)]
struct Stream {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    out: Option<Linear>,
}

/// Heads and head width.
#[derive(Debug, Clone, Copy)]
struct Heads {
    heads: usize,
    dim: usize,
}

/// The attention shape of a block: heads, features per head, query/key norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    /// Heads.
    pub heads: usize,
    /// Features per head.
    pub head_dim: usize,
    /// Query/key normalisation (None: SD3's none).
    pub qk_norm: Option<QkNorm>,
}

impl BlockShape {
    /// The token width, `heads · head_dim`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

impl Stream {
    #[allow(clippy::too_many_arguments)]
    fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: &Scope,
        [q, k, v, nq, nk]: [&str; 5],
        out: Option<&str>,
        d: usize,
        h: Heads,
        qk_norm: Option<QkNorm>,
    ) -> Result<Self> {
        let norm = |s: &mut ParamStore<B>, name: &str| -> Result<Option<RmsNorm>> {
            qk_norm.map(|QkNorm::Rms| RmsNorm::new(s, at.pp(name), h.dim, SD3_NORM_EPS)).transpose()
        };
        Ok(Self {
            q: Linear::new(s, at.pp(q), d, d)?,
            k: Linear::new(s, at.pp(k), d, d)?,
            v: Linear::new(s, at.pp(v), d, d)?,
            norm_q: norm(s, nq)?,
            norm_k: norm(s, nk)?,
            out: out.map(|o| Linear::new(s, at.pp(o), d, d)).transpose()?,
        })
    }

    /// `x [b, n, d]` → `q, k, v` as `[b·h, n, head]`, the norms applied per head.
    fn qkv<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, h: Heads) -> Result<[Var<B>; 3]> {
        let t = p.tape;
        let dims = B::shape(&x.value).dims().to_vec();
        let (b, n) = (dims[0], dims[1]);
        let split = |v: &Var<B>, norm: Option<&RmsNorm>| -> Result<Var<B>> {
            let v = t.reshape(v, &Shape::new([b, n, h.heads, h.dim]))?;
            let v = match norm {
                Some(norm) => norm.forward(p, &v)?,
                None => v,
            };
            t.reshape(&t.permute(&v, &[0, 2, 1, 3])?, &Shape::new([b * h.heads, n, h.dim]))
        };
        Ok([
            split(&self.q.forward(p, x)?, self.norm_q.as_ref())?,
            split(&self.k.forward(p, x)?, self.norm_k.as_ref())?,
            split(&self.v.forward(p, x)?, None)?,
        ])
    }
}

/// `[b·h, n, head]` → `[b, n, h·head]`.
fn merge_heads<B: Backend>(p: &Bound<'_, B>, o: &Var<B>, b: usize, h: Heads) -> Result<Var<B>> {
    let t = p.tape;
    let n = B::shape(&o.value).dims()[1];
    let o = t.permute(&t.reshape(o, &Shape::new([b, h.heads, n, h.dim]))?, &[0, 2, 1, 3])?;
    t.reshape(&o, &Shape::new([b, n, h.heads * h.dim]))
}

/// diffusers' `Attention` with `JointAttnProcessor2_0`: the image stream (`to_q`, `to_k`,
/// `to_v`, `to_out.0`) and, for joint attention, the text stream (`add_{q,k,v}_proj`,
/// `to_add_out` unless `context_pre_only`), attended together as one sequence
/// `[image tokens; text tokens]`.
#[derive(Debug, Clone)]
pub struct JointAttention {
    image: Stream,
    text: Option<Stream>,
    h: Heads,
}

impl JointAttention {
    /// `joint`: with the text stream (`attn`); else image-only (SD3.5's `attn2`). `context_pre_only`:
    /// the text stream's output is dropped (no `to_add_out`).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        shape: BlockShape,
        joint: bool,
        context_pre_only: bool,
    ) -> Result<Self> {
        Self::with_output(s, at, shape, joint, context_pre_only, true)
    }

    /// As [`Self::new`]; without `to_out` when not `image_out` (Flux's single-stream blocks,
    /// whose attention output goes into their own projection).
    pub fn with_output<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        shape: BlockShape,
        joint: bool,
        context_pre_only: bool,
        image_out: bool,
    ) -> Result<Self> {
        let at = at.into();
        let (d, h) = (shape.width(), Heads { heads: shape.heads, dim: shape.head_dim });
        let names = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
        let image = Stream::new(s, &at, names, image_out.then_some("to_out.0"), d, h, shape.qk_norm)?;
        let text = joint
            .then(|| {
                let names = ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"];
                Stream::new(s, &at, names, (!context_pre_only).then_some("to_add_out"), d, h, shape.qk_norm)
            })
            .transpose()?;
        Ok(Self { image, text, h })
    }

    /// `x [b, n, d]`, `context [b, s, d]` (joint attention only) → the image tokens' output and,
    /// unless `context_pre_only`, the text tokens'. `rope` (Flux) turns the queries and keys of
    /// the sequence `[image tokens; text tokens]` after their norms.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        context: Option<&Var<B>>,
        rope: Option<&Rotary<B>>,
    ) -> Result<(Var<B>, Option<Var<B>>)> {
        let t = p.tape;
        let dims = B::shape(&x.value).dims().to_vec();
        let (b, n) = (dims[0], dims[1]);
        let [mut q, mut k, mut v] = self.image.qkv(p, x, self.h)?;
        if let (Some(text), Some(ctx)) = (&self.text, context) {
            let [cq, ck, cv] = text.qkv(p, ctx, self.h)?;
            q = t.concat_channels(&[&q, &cq])?;
            k = t.concat_channels(&[&k, &ck])?;
            v = t.concat_channels(&[&v, &cv])?;
        }
        if let Some(rope) = rope {
            q = rope.apply(t, &q)?;
            k = rope.apply(t, &k)?;
        }
        let o = t.attention(&q, &k, &v, AttentionParams::new(self.h.dim))?; // [b·h, n (+ s), head]
        let total = B::shape(&o.value).dims()[1];
        let image = merge_heads(p, &t.narrow(&o, 1, 0, n)?, b, self.h)?;
        let image = match &self.image.out {
            Some(out) => out.forward(p, &image)?,
            None => image,
        };
        let text = match (&self.text, total > n) {
            (Some(Stream { out: Some(out), .. }), true) => {
                let ctx = merge_heads(p, &t.narrow(&o, 1, n, total - n)?, b, self.h)?;
                Some(out.forward(p, &ctx)?)
            }
            _ => None,
        };
        Ok((image, text))
    }
}

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`,
/// inner width `4·dim`.
#[derive(Debug, Clone)]
pub struct GeluFeedForward {
    proj: Linear,
    out: Linear,
}

impl GeluFeedForward {
    /// Parameters `net.0.proj`, `net.2` under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, d: usize) -> Result<Self> {
        let net = at.into().pp("net");
        Ok(Self { proj: Linear::new(s, net.pp(0).pp("proj"), d, 4 * d)?, out: Linear::new(s, net.pp(2), 4 * d, d)? })
    }

    /// `[.., d] → [.., d]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let h = p.tape.unary(UnaryOp::GeluTanh, &self.proj.forward(p, x)?)?;
        self.out.forward(p, &h)
    }
}

/// How a block normalises the text tokens before attention.
#[derive(Debug, Clone)]
enum ContextNorm {
    /// adaLN-Zero (6 chunks), the text tokens go on.
    Zero(Modulation),
    /// `AdaLayerNormContinuous` (scale, shift): the last block, whose text output is dropped.
    Continuous(Modulation),
}

/// diffusers' `JointTransformerBlock` (MMDiT).
#[derive(Debug, Clone)]
pub struct JointBlock {
    norm1: Modulation,
    norm1_context: ContextNorm,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    ff: GeluFeedForward,
    ff_context: Option<GeluFeedForward>,
}

impl JointBlock {
    /// Block parameters under `at`; `context_pre_only` for the transformer's last block,
    /// `dual` for SD3.5's blocks with a second attention.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: BlockShape,
        context_pre_only: bool,
        dual: bool,
    ) -> Result<Self> {
        let at = at.into();
        let d = c.width();
        Ok(Self {
            norm1: Modulation::new(s, at.pp("norm1"), d, if dual { 9 } else { 6 })?,
            norm1_context: if context_pre_only {
                ContextNorm::Continuous(Modulation::new(s, at.pp("norm1_context"), d, 2)?)
            } else {
                ContextNorm::Zero(Modulation::new(s, at.pp("norm1_context"), d, 6)?)
            },
            attn: JointAttention::new(s, at.pp("attn"), c, true, context_pre_only)?,
            attn2: dual.then(|| JointAttention::new(s, at.pp("attn2"), c, false, false)).transpose()?,
            ff: GeluFeedForward::new(s, at.pp("ff"), d)?,
            ff_context: (!context_pre_only).then(|| GeluFeedForward::new(s, at.pp("ff_context"), d)).transpose()?,
        })
    }

    /// Whether the block drops the text tokens (the transformer's last).
    pub fn context_pre_only(&self) -> bool {
        matches!(self.norm1_context, ContextNorm::Continuous(_))
    }

    /// `x [b, n, d]`, `context [b, s, d]`, `silu_temb [b, d]` → (`context` out, None for the
    /// last block; `x` out). `rope`: Flux's rotary positions of `[image; text]` tokens.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        context: &Var<B>,
        silu_temb: &Var<B>,
        rope: Option<&Rotary<B>>,
    ) -> Result<(Option<Var<B>>, Var<B>)> {
        let t = p.tape;
        let m = self.norm1.forward(p, silu_temb)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]
        let normed = plain_layer_norm(p, x)?;
        let norm_x = modulate(p, &normed, &m[0], &m[1])?;
        let (norm_ctx, ctx_mod) = match &self.norm1_context {
            ContextNorm::Zero(z) => {
                let cm = z.forward(p, silu_temb)?;
                (modulate(p, &plain_layer_norm(p, context)?, &cm[0], &cm[1])?, Some(cm))
            }
            // AdaLayerNormContinuous: (scale, shift), in that order.
            ContextNorm::Continuous(z) => {
                let cm = z.forward(p, silu_temb)?;
                (modulate(p, &plain_layer_norm(p, context)?, &cm[1], &cm[0])?, None)
            }
        };
        let (attn, ctx_attn) = self.attn.forward(p, &norm_x, Some(&norm_ctx), rope)?;
        let mut x = t.add(x, &gated(p, &m[2], &attn)?)?;
        if let Some(attn2) = &self.attn2 {
            let norm_x2 = modulate(p, &normed, &m[6], &m[7])?;
            let (a2, _) = attn2.forward(p, &norm_x2, None, None)?;
            x = t.add(&x, &gated(p, &m[8], &a2)?)?;
        }
        let ff_in = modulate(p, &plain_layer_norm(p, &x)?, &m[3], &m[4])?;
        let x = t.add(&x, &gated(p, &m[5], &self.ff.forward(p, &ff_in)?)?)?;
        let context = match (ctx_mod, ctx_attn, &self.ff_context) {
            (Some(cm), Some(ctx_attn), Some(ff_context)) => {
                let ctx = t.add(context, &gated(p, &cm[2], &ctx_attn)?)?;
                let ff_in = modulate(p, &plain_layer_norm(p, &ctx)?, &cm[3], &cm[4])?;
                Some(t.add(&ctx, &gated(p, &cm[5], &ff_context.forward(p, &ff_in)?)?)?)
            }
            _ => None,
        };
        Ok((context, x))
    }
}
