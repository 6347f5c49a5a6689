//! diffusers' `SD3Transformer2DModel`: patch tokens and text tokens through joint MMDiT
//! blocks, ControlNet residuals added to the image tokens after the blocks diffusers adds
//! them to, then the modulated output norm and the unpatchify.

use lisa_core::backend::{Backend, Shape};

use super::block::{JointBlock, Modulation, modulate, plain_layer_norm};
use super::config::Sd3Config;
use super::embed::{Embedded, Sd3Embeddings, Sd3Inputs};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::Linear;
use crate::params::{Bound, ParamStore, Scope};

/// The SD3 transformer: parameters with diffusers' names under its scope.
#[derive(Debug, Clone)]
pub struct Sd3Transformer {
    config: Sd3Config,
    embed: Sd3Embeddings,
    blocks: Vec<JointBlock>,
    norm_out: Modulation,
    proj_out: Linear,
}

impl Sd3Transformer {
    /// Every parameter under `at`, initialised (LeCun-normal weights, zero biases).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &Sd3Config) -> Result<Self> {
        let at = at.into();
        let d = c.inner_dim();
        let blocks = (0..c.num_layers)
            .map(|i| {
                let last = i + 1 == c.num_layers;
                JointBlock::new(s, at.pp("transformer_blocks").pp(i), c, last, c.dual_attention_layers.contains(&i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: Sd3Embeddings::new(s, &at, c)?,
            blocks,
            norm_out: Modulation::new(s, at.pp("norm_out"), d, 2)?,
            proj_out: Linear::new(s, at.pp("proj_out"), d, c.patch_size * c.patch_size * c.out_channels)?,
            config: c.clone(),
        })
    }

    /// The settings it was built from.
    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    /// The sin-cos table diffusers stores as `pos_embed.pos_embed` (`[1, m·m, dim]`).
    pub fn positions(&self) -> &[f32] {
        self.embed.positions()
    }

    /// `x [b, c, h, w]` → the prediction `[b, out_channels, h, w]`, with the ControlNet's
    /// `residuals` (`[b, n, dim]` each, already scaled) added to the image tokens after block
    /// `i` as diffusers does: residual `⌊i / (blocks / residuals)⌋`, every block but a
    /// `context_pre_only` one.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        inputs: &Sd3Inputs<'_, B>,
        residuals: Option<&[Var<B>]>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let c = &self.config;
        let dims = B::shape(&x.value).dims().to_vec();
        if dims.len() != 4 || dims[1] != c.in_channels || dims[2] != dims[3] {
            return Err(TrainError::Mismatch(format!(
                "the SD3 transformer takes square latents [b, {}, h, h], got {}",
                c.in_channels,
                B::shape(&x.value)
            )));
        }
        let (b, side) = (dims[0], dims[2]);
        let grid = c.grid(side)?;
        let Embedded { tokens: mut h, silu_temb, mut context } = self.embed.forward(p, x, inputs)?;
        if let Some(r) = residuals
            && r.is_empty()
        {
            return Err(TrainError::Mismatch("an empty list of ControlNet residuals".into()));
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let (ctx, out) = block.forward(p, &h, &context, &silu_temb)?;
            h = out;
            if let Some(ctx) = ctx {
                context = ctx;
            }
            if let Some(r) = residuals
                && !block.context_pre_only()
            {
                // diffusers: interval = blocks / residuals (a float), index = int(i / interval).
                let interval = self.blocks.len() as f64 / r.len() as f64;
                let k = (i as f64 / interval) as usize;
                let res = r.get(k).ok_or(TrainError::Internal("residual index past the list"))?;
                h = t.add(&h, res)?;
            }
        }
        let m = self.norm_out.forward(p, &silu_temb)?; // (scale, shift)
        let h = modulate(p, &plain_layer_norm(p, &h)?, &m[1], &m[0])?;
        let h = self.proj_out.forward(p, &h)?; // [b, n, p·p·c]
        let (ps, co) = (c.patch_size, c.out_channels);
        // [b, gh, gw, p, q, c] → [b, c, gh, p, gw, q] (einsum nhwpqc->nchpwq)
        let h = t.reshape(&h, &Shape::new([b, grid, grid, ps, ps, co]))?;
        let h = t.permute(&h, &[0, 5, 1, 3, 2, 4])?;
        let out = t.reshape(&h, &Shape::new([b, co, side, side]))?;
        t.cast(&out, lisa_core::backend::DType::F32)
    }
}
