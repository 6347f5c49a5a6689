//! diffusers' `SD3ControlNetModel`: the transformer's first blocks (all keeping their text
//! tokens), the condition latents added to the image tokens through a zero-initialised patch
//! embedding, and one zero-initialised linear `controlnet_blocks[i]` per block whose outputs,
//! times the conditioning scale, are the residuals.

use lisa_core::backend::Backend;

use super::block::JointBlock;
use super::config::{Sd3Config, Sd3ControlNetExtras};
use super::embed::{Embedded, PatchEmbed, Sd3Embeddings, Sd3Inputs};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::Linear;
use crate::params::{Bound, Init, ParamStore, Scope};

/// What a ControlNet pass returns.
#[derive(Debug, Clone)]
pub struct Sd3ControlOutput<B: Backend> {
    /// `controlnet_blocks[i](hidden[i]) · scale`, `[b, n, dim]` each: what the transformer adds.
    pub residuals: Vec<Var<B>>,
    /// The input of `controlnet_blocks[i]` (the image tokens after block `i`): the features a
    /// LISA decoder hooks (`block_i`).
    pub hidden: Vec<Var<B>>,
}

/// The SD3 ControlNet.
#[derive(Debug, Clone)]
pub struct Sd3ControlNet {
    config: Sd3Config,
    extras: Sd3ControlNetExtras,
    embed: Sd3Embeddings,
    blocks: Vec<JointBlock>,
    controlnet_blocks: Vec<Linear>,
    pos_embed_input: PatchEmbed,
}

impl Sd3ControlNet {
    /// Every parameter under `at`: `controlnet_blocks` and `pos_embed_input` zero, the rest
    /// initialised as the transformer's (diffusers' `from_transformer` then copies them in).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &Sd3Config,
        extras: Sd3ControlNetExtras,
    ) -> Result<Self> {
        let at = at.into();
        let d = c.inner_dim();
        let blocks = (0..c.num_layers)
            .map(|i| {
                JointBlock::new(
                    s,
                    at.pp("transformer_blocks").pp(i),
                    c.block_shape(),
                    false,
                    c.dual_attention_layers.contains(&i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let controlnet_blocks = (0..c.num_layers)
            .map(|i| {
                let at = at.pp("controlnet_blocks").pp(i);
                Ok(Linear {
                    weight: s.add(at.name("weight"), &[d, d], Init::Zeros)?,
                    bias: Some(s.add(at.name("bias"), &[d], Init::Zeros)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cond_channels = c.in_channels + extras.extra_conditioning_channels;
        let pos_embed_input = PatchEmbed::new(s, at.pp("pos_embed_input"), c, cond_channels, false)?;
        // zero_module(pos_embed_input)
        for id in [pos_embed_input.conv().weight, pos_embed_input.conv().bias] {
            let value = s.get(id).value.clone();
            s.get_mut(id).value = B::zeros_like(&value)?;
        }
        Ok(Self {
            embed: Sd3Embeddings::new(s, &at, c)?,
            blocks,
            controlnet_blocks,
            pos_embed_input,
            config: c.clone(),
            extras,
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> (&Sd3Config, Sd3ControlNetExtras) {
        (&self.config, self.extras)
    }

    /// `x [b, c, h, w]` (the noisy latents), `cond [b, c + extra, h, w]` (the VAE-encoded
    /// condition) → the residuals (times `scale`) and the hooked features.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        cond: &Var<B>,
        inputs: &Sd3Inputs<'_, B>,
        scale: f32,
    ) -> Result<Sd3ControlOutput<B>> {
        let t = p.tape;
        let (xs, cs) = (B::shape(&x.value), B::shape(&cond.value));
        let want_c = self.config.in_channels + self.extras.extra_conditioning_channels;
        if cs.rank() != 4 || cs.dims()[1] != want_c || cs.dims()[0] != xs.dims()[0] || cs.dims()[2..] != xs.dims()[2..]
        {
            return Err(TrainError::Mismatch(format!(
                "the SD3 ControlNet's condition must be [b, {want_c}, h, w] like the latents {xs}, got {cs}"
            )));
        }
        let Embedded { tokens, silu_temb, mut context } = self.embed.forward(p, x, inputs)?;
        let mut h = t.add(&tokens, &self.pos_embed_input.forward(p, cond)?)?;
        let mut hidden = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (ctx, out) = block.forward(p, &h, &context, &silu_temb, None)?;
            context = ctx.ok_or(TrainError::Internal("a ControlNet block keeps its text tokens"))?;
            h = out;
            hidden.push(h.clone());
        }
        let residuals = hidden
            .iter()
            .zip(&self.controlnet_blocks)
            .map(|(h, block)| t.scale(&block.forward(p, h)?, scale))
            .collect::<Result<Vec<_>>>()?;
        Ok(Sd3ControlOutput { residuals, hidden })
    }
}
