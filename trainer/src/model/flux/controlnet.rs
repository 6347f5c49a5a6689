//! diffusers' `FluxControlNetModel`: the transformer's first double- and single-stream
//! blocks, the condition latents added to the image tokens through a zero-initialised
//! `controlnet_x_embedder`, union mode's learned control-type token before the text, and one
//! zero-initialised linear per block (`controlnet_blocks`, `controlnet_single_blocks`) whose
//! outputs, times the conditioning scale, are the residuals.

use lisa_core::backend::{Backend, Shape};

use super::block::SingleBlock;
use super::config::{FluxConfig, FluxControlNetExtras};
use super::embed::{Embedded, FluxEmbeddings, FluxInputs, pack, rotary};
use super::transformer::FluxResiduals;
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::sd3::JointBlock;
use crate::nn::{ClassEmbedding, Linear};
use crate::params::{Bound, Init, ParamStore, Scope};

/// What a ControlNet pass returns.
#[derive(Debug, Clone)]
pub struct FluxControlOutput<B: Backend> {
    /// What the transformer adds.
    pub residuals: FluxResiduals<B>,
    /// The input of `controlnet_blocks[i]` (the image tokens after double block `i`): the
    /// features a LISA decoder hooks as `block_i`.
    pub hidden: Vec<Var<B>>,
    /// The input of `controlnet_single_blocks[i]`: hooked as `single_block_i`.
    pub single_hidden: Vec<Var<B>>,
}

/// A zero `Linear` `d → d` under `at` (diffusers' `zero_module`).
fn zero_linear<B: Backend>(s: &mut ParamStore<B>, at: Scope, d_in: usize, d: usize) -> Result<Linear> {
    Ok(Linear {
        weight: s.add(at.name("weight"), &[d, d_in], Init::Zeros)?,
        bias: Some(s.add(at.name("bias"), &[d], Init::Zeros)?),
    })
}

/// The Flux ControlNet.
#[derive(Debug, Clone)]
pub struct FluxControlNet {
    config: FluxConfig,
    extras: FluxControlNetExtras,
    embed: FluxEmbeddings,
    controlnet_x_embedder: Linear,
    mode_embedder: Option<ClassEmbedding>,
    blocks: Vec<JointBlock>,
    single_blocks: Vec<SingleBlock>,
    controlnet_blocks: Vec<Linear>,
    controlnet_single_blocks: Vec<Linear>,
}

impl FluxControlNet {
    /// Every parameter under `at`: the `controlnet_*` linears zero, the rest initialised as
    /// the transformer's (diffusers' `from_transformer` then copies them in).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &FluxConfig,
        extras: FluxControlNetExtras,
    ) -> Result<Self> {
        let at = at.into();
        let d = c.inner_dim();
        let blocks = (0..c.num_layers)
            .map(|i| JointBlock::new(s, at.pp("transformer_blocks").pp(i), c.block_shape(), false, false))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..c.num_single_layers)
            .map(|i| SingleBlock::new(s, at.pp("single_transformer_blocks").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let controlnet_blocks =
            (0..c.num_layers).map(|i| zero_linear(s, at.pp("controlnet_blocks").pp(i), d, d)).collect::<Result<_>>()?;
        let controlnet_single_blocks = (0..c.num_single_layers)
            .map(|i| zero_linear(s, at.pp("controlnet_single_blocks").pp(i), d, d))
            .collect::<Result<_>>()?;
        let mode_embedder =
            extras.num_mode.map(|n| ClassEmbedding::new(s, at.pp("controlnet_mode_embedder"), n, d)).transpose()?;
        Ok(Self {
            embed: FluxEmbeddings::new(s, &at, c)?,
            controlnet_x_embedder: zero_linear(s, at.pp("controlnet_x_embedder"), c.in_channels, d)?,
            mode_embedder,
            blocks,
            single_blocks,
            controlnet_blocks,
            controlnet_single_blocks,
            config: c.clone(),
            extras,
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> (&FluxConfig, FluxControlNetExtras) {
        (&self.config, self.extras)
    }

    /// `x [b, c, h, w]` (the noisy latents), `cond [b, c, h, w]` (the VAE-encoded condition),
    /// union mode's control type per sample (`mode`, exactly when the config has `num_mode`)
    /// → the residuals (times `scale`) and the hooked features.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        cond: &Var<B>,
        inputs: &FluxInputs<'_, B>,
        mode: Option<&[usize]>,
        scale: f32,
    ) -> Result<FluxControlOutput<B>> {
        let t = p.tape;
        let (xs, cs) = (B::shape(&x.value), B::shape(&cond.value));
        if xs != cs {
            return Err(TrainError::Mismatch(format!(
                "the Flux ControlNet's condition latents must have the latents' shape {xs}, got {cs}"
            )));
        }
        let Embedded { tokens, silu_temb, mut context, grid } = self.embed.forward(p, &self.config, x, inputs)?;
        let mut h = t.add(&tokens, &self.controlnet_x_embedder.forward(p, &pack(t, cond)?)?)?;
        match (&self.mode_embedder, mode) {
            (Some(embedder), Some(mode)) if mode.len() == xs.dims()[0] => {
                let d = self.config.inner_dim();
                let m = t.reshape(&embedder.forward(p, mode)?, &Shape::new([mode.len(), 1, d]))?;
                let m = t.cast(&m, B::dtype(&context.value))?;
                context = t.concat_channels(&[&m, &context])?; // the control type's token first
            }
            (None, None) => {}
            (Some(_), _) => {
                return Err(TrainError::Mismatch(format!(
                    "a union Flux ControlNet (num_mode {:?}) needs one control type per sample",
                    self.extras.num_mode
                )));
            }
            (None, Some(_)) => {
                return Err(TrainError::Mismatch("a control type for a Flux ControlNet without num_mode".into()));
            }
        }
        let text = B::shape(&context.value).dims()[1];
        let rope = rotary(t, &self.config, grid, text, &B::device(&h.value))?;
        let mut hidden = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (ctx, out) = block.forward(p, &h, &context, &silu_temb, Some(&rope))?;
            context = ctx.ok_or(TrainError::Internal("a Flux double block keeps its text tokens"))?;
            h = out;
            hidden.push(h.clone());
        }
        let mut single_hidden = Vec::with_capacity(self.single_blocks.len());
        for block in &self.single_blocks {
            (context, h) = block.forward(p, &h, &context, &silu_temb, &rope)?;
            single_hidden.push(h.clone());
        }
        let project = |features: &[Var<B>], linears: &[Linear]| -> Result<Vec<Var<B>>> {
            features.iter().zip(linears).map(|(h, l)| t.scale(&l.forward(p, h)?, scale)).collect()
        };
        let residuals = FluxResiduals {
            blocks: project(&hidden, &self.controlnet_blocks)?,
            single: project(&single_hidden, &self.controlnet_single_blocks)?,
        };
        Ok(FluxControlOutput { residuals, hidden, single_hidden })
    }
}
