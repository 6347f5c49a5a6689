//! diffusers' `SD3Transformer2DModel`: patch tokens and text tokens through joint MMDiT
//! blocks, ControlNet residuals added to the image tokens after the blocks diffusers adds
//! them to, then the modulated output norm and the unpatchify.

use lisa_core::backend::{Backend, Shape};

use super::block::{JointBlock, Modulation, modulate, plain_layer_norm};
use super::config::Sd3Config;
use super::embed::{Embedded, Sd3Embeddings, Sd3Inputs};
use crate::autodiff::{Tape, Var};
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
                JointBlock::new(
                    s,
                    at.pp("transformer_blocks").pp(i),
                    c.block_shape(),
                    last,
                    c.dual_attention_layers.contains(&i),
                )
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
        let embedded = self.embed(p, x, inputs)?;
        self.decode(p, embedded, residuals)
    }

    /// The inputs of the blocks: `x [b, c, h, w]`'s patch tokens with their positions, the
    /// modulation input and the projected text tokens (what the prior pass and the controlled
    /// pass share).
    pub fn embed<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, inputs: &Sd3Inputs<'_, B>) -> Result<Embedded<B>> {
        let c = &self.config;
        let dims = B::shape(&x.value).dims().to_vec();
        if dims.len() != 4 || dims[1] != c.in_channels || dims[2] != dims[3] {
            return Err(TrainError::Mismatch(format!(
                "the SD3 transformer takes square latents [b, {}, h, h], got {}",
                c.in_channels,
                B::shape(&x.value)
            )));
        }
        c.grid(dims[2])?;
        self.embed.forward(p, x, inputs)
    }

    /// The blocks, the output norm and the unpatchify over `embedded`, with `residuals` as in
    /// [`Self::forward`] → `[b, out_channels, h, w]` (f32).
    pub fn decode<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        embedded: Embedded<B>,
        residuals: Option<&[Var<B>]>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let c = &self.config;
        let Embedded { tokens: mut h, silu_temb, mut context } = embedded;
        if let Some(r) = residuals
            && r.is_empty()
        {
            return Err(TrainError::Mismatch("an empty list of ControlNet residuals".into()));
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let (ctx, out) = block.forward(p, &h, &context, &silu_temb, None)?;
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
                // The residual (f32 from a ControlNet with f32 masters) in the tokens' type.
                let res = t.cast(res, B::dtype(&h.value))?;
                h = t.add(&h, &res)?;
            }
        }
        let m = self.norm_out.forward(p, &silu_temb)?; // (scale, shift)
        let h = modulate(p, &plain_layer_norm(p, &h)?, &m[1], &m[0])?;
        let h = self.proj_out.forward(p, &h)?; // [b, n, p·p·c]
        let out = unpatchify(p.tape, &h, c.patch_size, c.out_channels)?;
        t.cast(&out, lisa_core::backend::DType::F32)
    }
}

/// Patch tokens `[b, g·g, p·p·c]` (each row-major over `(p, q, c)`) → the image
/// `[b, c, g·p, g·p]`: diffusers' `einsum("nhwpqc->nchpwq")`. An error when the tokens do not
/// make a square grid or their width is not `p·p·c`.
pub fn unpatchify<B: Backend>(t: &Tape<B>, h: &Var<B>, patch: usize, channels: usize) -> Result<Var<B>> {
    let d = B::shape(&h.value).dims().to_vec();
    let grid = (d.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize;
    if d.len() != 3 || grid * grid != d[1] || grid == 0 || d[2] != patch * patch * channels {
        return Err(TrainError::Mismatch(format!(
            "unpatchify takes [b, g·g, {}] tokens (patch {patch}, {channels} channels), got {}",
            patch * patch * channels,
            B::shape(&h.value)
        )));
    }
    let (b, side) = (d[0], grid * patch);
    // [b, gh, gw, p, q, c] → [b, c, gh, p, gw, q]
    let h = t.reshape(h, &Shape::new([b, grid, grid, patch, patch, channels]))?;
    let h = t.permute(&h, &[0, 5, 1, 3, 2, 4])?;
    t.reshape(&h, &Shape::new([b, channels, side, side]))
}
