//! Flux's single-stream block (diffusers' `FluxSingleTransformerBlock`): image and text
//! tokens as one sequence, one modulation (`AdaLayerNormZeroSingle`: shift, scale, gate), an
//! attention without output projection beside a tanh-GELU MLP, both read by one projection:
//!
//! `h = LN(x)·(1 + scale) + shift`, `x' = x + gate · proj_out(attn(h) ‖ gelu(proj_mlp(h)))`.
//!
//! The double-stream block is SD3's MMDiT block with RMS query/key norms and rotary positions
//! ([`JointBlock`](crate::model::sd3::JointBlock)).

use lisa_core::backend::{Backend, UnaryOp};

use super::config::FluxConfig;
use crate::autodiff::Var;
use crate::error::Result;
use crate::model::sd3::{JointAttention, Modulation, gated, modulate, plain_layer_norm};
use crate::nn::{Linear, Rotary};
use crate::params::{Bound, ParamStore, Scope};

/// The MLP's width as a multiple of the token width (`mlp_ratio`).
const MLP_RATIO: usize = 4;

/// `FluxSingleTransformerBlock`.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    norm: Modulation,
    proj_mlp: Linear,
    attn: JointAttention,
    proj_out: Linear,
}

impl SingleBlock {
    /// Parameters under `at`: `norm.linear`, `proj_mlp`, `attn.{to_q,to_k,to_v,norm_q,norm_k}`,
    /// `proj_out`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &FluxConfig) -> Result<Self> {
        let at = at.into();
        let d = c.inner_dim();
        Ok(Self {
            norm: Modulation::new(s, at.pp("norm"), d, 3)?,
            proj_mlp: Linear::new(s, at.pp("proj_mlp"), d, MLP_RATIO * d)?,
            attn: JointAttention::with_output(s, at.pp("attn"), c.block_shape(), false, false, false)?,
            proj_out: Linear::new(s, at.pp("proj_out"), (MLP_RATIO + 1) * d, d)?,
        })
    }

    /// `x [b, n, d]` (image), `context [b, s, d]` (text), `silu_temb [b, d]`, the rotary
    /// tables of `[image; text]` → (`context` out, `x` out).
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        context: &Var<B>,
        silu_temb: &Var<B>,
        rope: &Rotary<B>,
    ) -> Result<(Var<B>, Var<B>)> {
        let t = p.tape;
        let (n, s) = (B::shape(&x.value).dims()[1], B::shape(&context.value).dims()[1]);
        let seq = t.concat_channels(&[x, context])?; // [b, n + s, d]
        let m = self.norm.forward(p, silu_temb)?; // shift, scale, gate
        let h = modulate(p, &plain_layer_norm(p, &seq)?, &m[0], &m[1])?;
        let mlp = t.unary(UnaryOp::GeluTanh, &self.proj_mlp.forward(p, &h)?)?;
        let (attn, _) = self.attn.forward(p, &h, None, Some(rope))?;
        let out = self.proj_out.forward_concat(p, &[&attn, &mlp])?;
        let seq = t.add(&seq, &gated(p, &m[2], &out)?)?;
        Ok((t.narrow(&seq, 1, n, s)?, t.narrow(&seq, 1, 0, n)?))
    }
}
