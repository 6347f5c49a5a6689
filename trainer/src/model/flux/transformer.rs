//! diffusers' `FluxTransformer2DModel`: packed latent tokens and text tokens through the
//! double-stream blocks, then as one sequence through the single-stream blocks, ControlNet
//! residuals added to the image tokens after the blocks diffusers adds them to, then the
//! modulated output norm, the output projection and the unpacking.

use lisa_core::backend::{Backend, DType};

use super::block::SingleBlock;
use super::config::FluxConfig;
use super::embed::{Embedded, FluxEmbeddings, FluxInputs, rotary, unpack};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::sd3::{JointBlock, Modulation, modulate, plain_layer_norm};
use crate::nn::Linear;
use crate::params::{Bound, ParamStore, Scope};

/// A Flux ControlNet's residuals, `[b, n, dim]` each, already scaled.
#[derive(Debug, Clone)]
pub struct FluxResiduals<B: Backend> {
    /// After the double-stream blocks (`controlnet_block_samples`).
    pub blocks: Vec<Var<B>>,
    /// After the single-stream blocks (`controlnet_single_block_samples`; may be empty).
    pub single: Vec<Var<B>>,
}

/// The residual that follows block `i` of `blocks` when there are `residuals` of them:
/// diffusers' `i // ceil(blocks / residuals)`.
fn residual_index(i: usize, blocks: usize, residuals: usize) -> usize {
    i / blocks.div_ceil(residuals)
}

/// The Flux transformer: parameters with diffusers' names under its scope.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    config: FluxConfig,
    embed: FluxEmbeddings,
    blocks: Vec<JointBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Modulation,
    proj_out: Linear,
}

impl FluxTransformer {
    /// Every parameter under `at`, initialised (LeCun-normal weights, zero biases).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &FluxConfig) -> Result<Self> {
        let at = at.into();
        let d = c.inner_dim();
        let blocks = (0..c.num_layers)
            .map(|i| JointBlock::new(s, at.pp("transformer_blocks").pp(i), c.block_shape(), false, false))
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..c.num_single_layers)
            .map(|i| SingleBlock::new(s, at.pp("single_transformer_blocks").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: FluxEmbeddings::new(s, &at, c)?,
            blocks,
            single_blocks,
            norm_out: Modulation::new(s, at.pp("norm_out"), d, 2)?,
            proj_out: Linear::new(s, at.pp("proj_out"), d, c.out_channels)?,
            config: c.clone(),
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Latents `x [b, in_channels/4, h, w]` → the prediction `[b, out_channels/4, h, w]`
    /// (f32), with the ControlNet's `residuals` added as diffusers adds them.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        inputs: &FluxInputs<'_, B>,
        residuals: Option<&FluxResiduals<B>>,
    ) -> Result<Var<B>> {
        let embedded = self.embed(p, x, inputs)?;
        self.decode(p, embedded, residuals)
    }

    /// The inputs of the blocks (what the prior pass and the controlled pass share).
    pub fn embed<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, inputs: &FluxInputs<'_, B>) -> Result<Embedded<B>> {
        self.embed.forward(p, &self.config, x, inputs)
    }

    /// The blocks, the output norm and projection and the unpacking over `embedded`, with
    /// `residuals` as in [`Self::forward`].
    pub fn decode<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        embedded: Embedded<B>,
        residuals: Option<&FluxResiduals<B>>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let Embedded { tokens: mut h, silu_temb, mut context, grid } = embedded;
        let text = B::shape(&context.value).dims()[1];
        let rope = rotary(t, &self.config, grid, text, &B::device(&h.value))?;
        if let Some(r) = residuals
            && r.blocks.is_empty()
        {
            return Err(TrainError::Mismatch("a Flux ControlNet gives at least one double-block residual".into()));
        }
        let add = |h: &Var<B>, list: &[Var<B>], i: usize, blocks: usize| -> Result<Var<B>> {
            let res = list
                .get(residual_index(i, blocks, list.len()))
                .ok_or(TrainError::Internal("residual index past the list"))?;
            t.add(h, &t.cast(res, B::dtype(&h.value))?)
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let (ctx, out) = block.forward(p, &h, &context, &silu_temb, Some(&rope))?;
            context = ctx.ok_or(TrainError::Internal("a Flux double block keeps its text tokens"))?;
            h = out;
            if let Some(r) = residuals {
                h = add(&h, &r.blocks, i, self.blocks.len())?;
            }
        }
        for (i, block) in self.single_blocks.iter().enumerate() {
            (context, h) = block.forward(p, &h, &context, &silu_temb, &rope)?;
            if let Some(r) = residuals
                && !r.single.is_empty()
            {
                h = add(&h, &r.single, i, self.single_blocks.len())?;
            }
        }
        let m = self.norm_out.forward(p, &silu_temb)?; // (scale, shift)
        let h = modulate(p, &plain_layer_norm(p, &h)?, &m[1], &m[0])?;
        let h = self.proj_out.forward(p, &h)?; // [b, n, out_channels]
        t.cast(&unpack(t, &h, grid)?, DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::residual_index;

    #[test]
    fn residuals_follow_diffusers_ceil_interval() {
        // 19 double blocks, 2 residuals: interval 10 → blocks 0..9 take 0, 10..18 take 1.
        assert_eq!((residual_index(9, 19, 2), residual_index(10, 19, 2)), (0, 1));
        // 3 single blocks, 2 residuals: interval 2.
        assert_eq!([0, 1, 2].map(|i| residual_index(i, 3, 2)), [0, 0, 1]);
        assert_eq!([0, 1].map(|i| residual_index(i, 2, 1)), [0, 0]);
    }
}
