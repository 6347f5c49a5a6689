//! What turns Flux's inputs into tokens: the packed latents (2×2 patches of the VAE's
//! latents, one token each) through `x_embedder`, the text through `context_embedder`, the
//! timestep, guidance scale and pooled text through `time_text_embed`, and the rotary
//! positions of every token (text tokens at position 0, image tokens at (0, row, column)).

use lisa_core::backend::{Backend, Shape};

use super::config::{FluxConfig, ROPE_THETA};
use crate::autodiff::{Tape, Var};
use crate::error::{Result, TrainError};
use crate::model::sd3::TimeTextEmbed;
use crate::nn::{Linear, Rotary, rotary_tables};
use crate::params::{Bound, ParamStore, Scope};

/// Latents `[b, c, h, w]` → tokens `[b, (h/2)·(w/2), 4c]`, each token a 2×2 patch laid out
/// `(c, 2, 2)` (diffusers' `_pack_latents`: `view(b, c, h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5)`).
pub fn pack<B: Backend>(t: &Tape<B>, x: &Var<B>) -> Result<Var<B>> {
    let d = B::shape(&x.value).dims().to_vec();
    if d.len() != 4 || !d[2].is_multiple_of(2) || !d[3].is_multiple_of(2) || d[2] == 0 || d[3] == 0 {
        return Err(TrainError::Mismatch(format!(
            "Flux packs latents [b, c, h, w] of even sides into 2×2 tokens, got {}",
            B::shape(&x.value)
        )));
    }
    let (b, c, gh, gw) = (d[0], d[1], d[2] / 2, d[3] / 2);
    let x = t.reshape(x, &Shape::new([b, c, gh, 2, gw, 2]))?;
    let x = t.permute(&x, &[0, 2, 4, 1, 3, 5])?; // [b, gh, gw, c, 2, 2]
    t.reshape(&x, &Shape::new([b, gh * gw, 4 * c]))
}

/// Tokens `[b, gh·gw, 4c]` → latents `[b, c, 2gh, 2gw]` (the inverse of [`pack`]).
pub fn unpack<B: Backend>(t: &Tape<B>, tokens: &Var<B>, (gh, gw): (usize, usize)) -> Result<Var<B>> {
    let d = B::shape(&tokens.value).dims().to_vec();
    if d.len() != 3 || d[1] != gh * gw || !d[2].is_multiple_of(4) {
        return Err(TrainError::Mismatch(format!(
            "unpacking {}: not [b, {gh}·{gw}, 4c] tokens",
            B::shape(&tokens.value)
        )));
    }
    let (b, c) = (d[0], d[2] / 4);
    let x = t.reshape(tokens, &Shape::new([b, gh, gw, c, 2, 2]))?;
    let x = t.permute(&x, &[0, 3, 1, 4, 2, 5])?; // [b, c, gh, 2, gw, 2]
    t.reshape(&x, &Shape::new([b, c, 2 * gh, 2 * gw]))
}

/// The position ids of a `gh × gw` grid of image tokens (row-major), `(0, row, column)`, then
/// `text` text tokens at 0 (diffusers' `_prepare_latent_image_ids` and zero `txt_ids`): the
/// order of lisa's joint sequence, image tokens first.
pub fn position_ids((gh, gw): (usize, usize), text: usize) -> Vec<Vec<f32>> {
    let image = (0..gh * gw).map(|i| vec![0.0, (i / gw) as f32, (i % gw) as f32]);
    image.chain((0..text).map(|_| vec![0.0; 3])).collect()
}

/// The rotary tables of a pass over a `grid` of image tokens and `text` text tokens.
pub fn rotary<B: Backend>(
    tape: &Tape<B>,
    c: &FluxConfig,
    grid: (usize, usize),
    text: usize,
    device: &B::Device,
) -> Result<Rotary<B>> {
    let ids = position_ids(grid, text);
    let (cos, sin) = rotary_tables(&ids, &c.axes_dims_rope, ROPE_THETA)?;
    Rotary::new(tape, (&cos, &sin), ids.len(), device)
}

/// What conditions a pass: the text tokens, the pooled text, the timesteps and, for Flux-dev,
/// the guidance scales.
#[derive(Debug, Clone)]
pub struct FluxInputs<'a, B: Backend> {
    /// `encoder_hidden_states [b, s, joint_attention_dim]` (T5).
    pub context: &'a Var<B>,
    /// `pooled_projections [b, pooled_projection_dim]` (CLIP).
    pub pooled: &'a Var<B>,
    /// One timestep per sample, the flow's σ·1000 (diffusers multiplies σ by 1000 inside).
    pub t: &'a [f32],
    /// One guidance scale per sample ×1000 (Flux-dev; None for a model without
    /// `guidance_embeds`).
    pub guidance: Option<&'a [f32]>,
}

/// What the blocks of the transformer and of its ControlNet read, made alike by both.
#[derive(Debug, Clone)]
pub struct FluxEmbeddings {
    x_embedder: Linear,
    context_embedder: Linear,
    time_text_embed: TimeTextEmbed,
}

/// The embedded inputs of the blocks.
pub struct Embedded<B: Backend> {
    /// The image tokens, `[b, n, dim]`.
    pub tokens: Var<B>,
    /// `silu(temb)`, `[b, dim]`: what every modulation reads.
    pub silu_temb: Var<B>,
    /// The projected text tokens, `[b, s, dim]`.
    pub context: Var<B>,
    /// The image tokens' grid (rows, columns).
    pub grid: (usize, usize),
}

impl FluxEmbeddings {
    /// `x_embedder`, `context_embedder` and `time_text_embed` under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: &Scope, c: &FluxConfig) -> Result<Self> {
        let d = c.inner_dim();
        Ok(Self {
            x_embedder: Linear::new(s, at.pp("x_embedder"), c.in_channels, d)?,
            context_embedder: Linear::new(s, at.pp("context_embedder"), c.joint_attention_dim, d)?,
            time_text_embed: TimeTextEmbed::with_widths(
                s,
                at.pp("time_text_embed"),
                d,
                c.pooled_projection_dim,
                c.guidance_embeds,
            )?,
        })
    }

    /// Latents `x [b, in_channels/4, h, w]` and the conditioning → the blocks' inputs.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        c: &FluxConfig,
        x: &Var<B>,
        inputs: &FluxInputs<'_, B>,
    ) -> Result<Embedded<B>> {
        let dims = B::shape(&x.value).dims().to_vec();
        if dims.len() != 4 || dims[1] * 4 != c.in_channels {
            return Err(TrainError::Mismatch(format!(
                "Flux takes latents [b, {}, h, w] (in_channels {} = 4 × the latent channels), got {}",
                c.in_channels / 4,
                c.in_channels,
                B::shape(&x.value)
            )));
        }
        let tokens = self.x_embedder.forward(p, &pack(p.tape, x)?)?;
        let temb = self.time_text_embed.forward_guided(p, inputs.t, inputs.guidance, inputs.pooled)?;
        let silu_temb = p.tape.silu(&temb)?;
        let context = self.context_embedder.forward(p, inputs.context)?;
        Ok(Embedded { tokens, silu_temb, context, grid: (dims[2] / 2, dims[3] / 2) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lisa_core::backend::DType;
    use lisa_core::backend::prelude::*;
    use lisa_cpu::{CpuBackend as C, CpuDevice};

    #[test]
    fn pack_takes_2x2_patches_channel_major_and_unpack_inverts_it() {
        let tape = Tape::<C>::new();
        // [1, 2, 2, 4]: channel c, row y, column x holds 100c + 10y + x.
        let values: Vec<f32> =
            (0..2).flat_map(|c| (0..2).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))).collect();
        let x = tape.constant(C::from_slice(&values, &Shape::new([1, 2, 2, 4]), DType::F32, &CpuDevice).unwrap());
        let packed = pack(&tape, &x).unwrap();
        assert_eq!(C::shape(&packed.value).dims(), &[1, 2, 8]);
        let v = C::to_vec(&packed.value).unwrap();
        // Token 1 is the patch at columns 2..4: channel 0's (0,2), (0,3), (1,2), (1,3), then channel 1's.
        assert_eq!(&v[8..], &[2.0, 3.0, 12.0, 13.0, 102.0, 103.0, 112.0, 113.0]);
        let back = unpack(&tape, &packed, (1, 2)).unwrap();
        assert_eq!(C::to_vec(&back.value).unwrap(), values);
        assert_eq!(position_ids((2, 3), 1)[4], vec![0.0, 1.0, 1.0]);
        assert_eq!(position_ids((2, 3), 1)[6], vec![0.0; 3]);
    }
}
