//! What turns SD3's inputs into tokens: the patch embedding with its cropped 2-D sin-cos
//! positions, and the timestep + pooled-text embedding every block is modulated by.

use lisa_core::backend::{Backend, DType, Shape};

use super::config::Sd3Config;
use crate::autodiff::Var;
use crate::error::Result;
use crate::model::sd::timestep_embedding;
use crate::nn::{Conv2d, Conv2dConfig, Linear};
use crate::params::{Bound, ParamStore, Scope};

/// diffusers' 2-D sin-cos table (`get_2d_sincos_pos_embed`, `pos_embed_max_size` positions
/// per side, `base_size = sample_size / patch_size`): `[m·m, dim]`, row `i·m + j` =
/// `[sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)]` with `x = j·base/m` (the column; diffusers puts it
/// first), `y = i·base/m`, `ω_k = 10000^(−k/(dim/4))`. Coordinates in f32 and the rest in f64,
/// as torch computes them.
pub fn sincos_positions(dim: usize, m: usize, base_size: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let step = (m as f64 / base_size as f64) as f32;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = vec![0.0f32; m * m * dim];
    for i in 0..m {
        for j in 0..m {
            let row = &mut out[(i * m + j) * dim..(i * m + j + 1) * dim];
            for (half, coord) in [(0, j), (1, i)] {
                let p = (coord as f32 / step) as f64;
                for (k, w) in omega.iter().enumerate() {
                    row[half * 2 * quarter + k] = (p * w).sin() as f32;
                    row[half * 2 * quarter + quarter + k] = (p * w).cos() as f32;
                }
            }
        }
    }
    out
}

/// The centred `grid × grid` crop of an `m × m` table of `dim`-wide rows (`cropped_pos_embed`).
pub fn crop_positions(table: &[f32], dim: usize, m: usize, grid: usize) -> Vec<f32> {
    let top = (m - grid) / 2;
    let mut out = Vec::with_capacity(grid * grid * dim);
    for i in top..top + grid {
        let start = (i * m + top) * dim;
        out.extend_from_slice(&table[start..start + grid * dim]);
    }
    out
}

/// `PatchEmbed`: a `p×p`, stride-`p` convolution to the token width, flattened to tokens
/// (row-major over the patch grid), plus the cropped positions when it has them.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Conv2d,
    /// `(dim, m, the full table)`: None for the ControlNet's `pos_embed_input`.
    positions: Option<(usize, usize, Vec<f32>)>,
}

impl PatchEmbed {
    /// `proj` under `at`, from `in_channels` to the config's width; with positions unless
    /// `positions` is false.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &Sd3Config,
        in_channels: usize,
        positions: bool,
    ) -> Result<Self> {
        let (p, dim) = (c.patch_size, c.inner_dim());
        let conv = Conv2dConfig::new(in_channels, dim, p).padding(0).stride(p);
        let table = positions.then(|| {
            let m = c.pos_embed_max_size;
            (dim, m, sincos_positions(dim, m, c.sample_size / c.patch_size))
        });
        Ok(Self { proj: Conv2d::new(s, at.into().pp("proj"), conv)?, positions: table })
    }

    /// The positions table `[1, m·m, dim]` diffusers stores as the buffer `pos_embed.pos_embed`.
    pub fn table(&self) -> Option<&[f32]> {
        self.positions.as_ref().map(|(_, _, t)| t.as_slice())
    }

    /// `x [b, c, h, w]` → tokens `[b, (h/p)·(w/p), dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let y = self.proj.forward(p, x)?; // [b, dim, gh, gw]
        let d = B::shape(&y.value).dims().to_vec();
        let (b, dim, gh, gw) = (d[0], d[1], d[2], d[3]);
        let tokens = t.permute(&t.reshape(&y, &Shape::new([b, dim, gh * gw]))?, &[0, 2, 1])?; // [b, n, dim]
        let Some((_, m, table)) = &self.positions else { return Ok(tokens) };
        if gh != gw || gh > *m {
            return Err(crate::error::TrainError::Config(format!(
                "a {gh}×{gw} patch grid: lisa's SD3 takes square grids of at most pos_embed_max_size = {m} per side"
            )));
        }
        let pos = crop_positions(table, dim, *m, gh);
        let pos = B::from_slice(&pos, &Shape::new([1, gh * gw, dim]), DType::F32, &B::device(&y.value))?;
        t.add(&tokens, &t.constant(pos))
    }

    /// The convolution's parameters (for `pos_embed_input`'s zero initialisation).
    pub fn conv(&self) -> &Conv2d {
        &self.proj
    }
}

/// `CombinedTimestepTextProjEmbeddings`: `timestep_embedder(sinusoid₂₅₆(t)) +
/// text_embedder(pooled)`, each `linear_2(silu(linear_1(·)))`; Flux-dev's
/// `CombinedTimestepGuidanceTextProjEmbeddings` adds `guidance_embedder(sinusoid₂₅₆(g))`.
#[derive(Debug, Clone)]
pub struct TimeTextEmbed {
    time_1: Linear,
    time_2: Linear,
    guidance: Option<(Linear, Linear)>,
    text_1: Linear,
    text_2: Linear,
}

/// The width of the timestep sinusoid.
const TIME_PROJ_DIM: usize = 256;

impl TimeTextEmbed {
    /// Parameters under `at` (`timestep_embedder.linear_{1,2}`, `text_embedder.linear_{1,2}`).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &Sd3Config) -> Result<Self> {
        Self::with_widths(s, at, c.inner_dim(), c.pooled_projection_dim, false)
    }

    /// Into `dim` from pooled text of `pooled_dim`; with `guidance_embedder.linear_{1,2}` when
    /// `guidance`.
    pub fn with_widths<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        dim: usize,
        pooled_dim: usize,
        guidance: bool,
    ) -> Result<Self> {
        let at = at.into();
        let (time, text, guide) = (at.pp("timestep_embedder"), at.pp("text_embedder"), at.pp("guidance_embedder"));
        Ok(Self {
            time_1: Linear::new(s, time.pp("linear_1"), TIME_PROJ_DIM, dim)?,
            time_2: Linear::new(s, time.pp("linear_2"), dim, dim)?,
            guidance: guidance
                .then(|| -> Result<_> {
                    Ok((
                        Linear::new(s, guide.pp("linear_1"), TIME_PROJ_DIM, dim)?,
                        Linear::new(s, guide.pp("linear_2"), dim, dim)?,
                    ))
                })
                .transpose()?,
            text_1: Linear::new(s, text.pp("linear_1"), pooled_dim, dim)?,
            text_2: Linear::new(s, text.pp("linear_2"), dim, dim)?,
        })
    }

    /// Whether it embeds a guidance scale (Flux-dev).
    pub fn guided(&self) -> bool {
        self.guidance.is_some()
    }

    /// Timesteps `t [b]` (the flow's σ·1000) and `pooled [b, pooled_projection_dim]` → `[b, dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, t: &[f32], pooled: &Var<B>) -> Result<Var<B>> {
        self.forward_guided(p, t, None, pooled)
    }

    /// As [`Self::forward`], plus the guidance scales `g [b]` (×1000, as diffusers passes
    /// them) of a guided embedding; one is needed exactly when the embedding has a
    /// `guidance_embedder`.
    pub fn forward_guided<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        t: &[f32],
        guidance: Option<&[f32]>,
        pooled: &Var<B>,
    ) -> Result<Var<B>> {
        let tape = p.tape;
        let device = B::device(&pooled.value);
        let sinusoid = |v: &[f32]| -> Result<Var<B>> {
            let sin = timestep_embedding(v, TIME_PROJ_DIM, true, 0);
            Ok(tape.constant(B::from_slice(&sin, &Shape::new([v.len(), TIME_PROJ_DIM]), DType::F32, &device)?))
        };
        let mut time = self.time_2.forward(p, &tape.silu(&self.time_1.forward(p, &sinusoid(t)?)?)?)?;
        match (&self.guidance, guidance) {
            (Some((g1, g2)), Some(g)) if g.len() == t.len() => {
                let g = g2.forward(p, &tape.silu(&g1.forward(p, &sinusoid(g)?)?)?)?;
                time = tape.add(&time, &g)?;
            }
            (None, None) => {}
            (Some(_), _) => {
                return Err(crate::error::TrainError::Mismatch(format!(
                    "a guidance-embedding model needs one guidance scale per sample ({} timesteps, {:?} scales)",
                    t.len(),
                    guidance.map(<[f32]>::len)
                )));
            }
            (None, Some(_)) => {
                return Err(crate::error::TrainError::Mismatch(
                    "a guidance scale for a model without guidance_embeds".into(),
                ));
            }
        }
        let text = self.text_2.forward(p, &tape.silu(&self.text_1.forward(p, pooled)?)?)?;
        tape.add(&time, &text)
    }
}

/// What conditions a pass: the text tokens, the pooled text projections and the timesteps.
#[derive(Debug, Clone)]
pub struct Sd3Inputs<'a, B: Backend> {
    /// `encoder_hidden_states [b, s, joint_attention_dim]`.
    pub context: &'a Var<B>,
    /// `pooled_projections [b, pooled_projection_dim]`.
    pub pooled: &'a Var<B>,
    /// One timestep per sample (the flow's σ·1000).
    pub t: &'a [f32],
}

/// What the blocks of the transformer and of its ControlNet read, made alike by both:
/// `pos_embed`, `time_text_embed` and `context_embedder` under their scope.
#[derive(Debug, Clone)]
pub struct Sd3Embeddings {
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
}

/// The embedded inputs of the blocks.
pub struct Embedded<B: Backend> {
    /// The image tokens with their positions, `[b, n, dim]`.
    pub tokens: Var<B>,
    /// `silu(temb)`, `[b, dim]`: what every modulation reads.
    pub silu_temb: Var<B>,
    /// The projected text tokens, `[b, s, dim]`.
    pub context: Var<B>,
}

impl Sd3Embeddings {
    /// The three embeddings under `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: &Scope, c: &Sd3Config) -> Result<Self> {
        Ok(Self {
            pos_embed: PatchEmbed::new(s, at.pp("pos_embed"), c, c.in_channels, true)?,
            time_text_embed: TimeTextEmbed::new(s, at.pp("time_text_embed"), c)?,
            context_embedder: Linear::new(
                s,
                at.pp("context_embedder"),
                c.joint_attention_dim,
                c.caption_projection_dim,
            )?,
        })
    }

    /// The sin-cos table of `pos_embed`.
    pub fn positions(&self) -> &[f32] {
        self.pos_embed.table().expect("pos_embed has positions")
    }

    /// `x [b, c, h, w]` and the conditioning → the blocks' inputs.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>, inputs: &Sd3Inputs<'_, B>) -> Result<Embedded<B>> {
        let tokens = self.pos_embed.forward(p, x)?;
        let silu_temb = p.tape.silu(&self.time_text_embed.forward(p, inputs.t, inputs.pooled)?)?;
        let context = self.context_embedder.forward(p, inputs.context)?;
        Ok(Embedded { tokens, silu_temb, context })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_put_the_column_first_and_crop_the_centre() {
        let (dim, m) = (8, 4);
        let table = sincos_positions(dim, m, 2);
        // Row (i = 1, j = 3): x = 3·2/4 = 1.5, y = 0.5; ω = [1, 1/100].
        let row = &table[(4 + 3) * dim..(4 + 4) * dim];
        let want = [1.5f64.sin(), 0.015f64.sin(), 1.5f64.cos(), 0.015f64.cos(), 0.5f64.sin(), 0.005f64.sin()];
        for (got, want) in row.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{row:?}");
        }
        let crop = crop_positions(&table, dim, m, 2);
        assert_eq!(&crop[..dim], &table[(m + 1) * dim..(m + 2) * dim], "the crop starts at (1, 1)");
        assert_eq!(&crop[3 * dim..], &table[(2 * m + 2) * dim..(2 * m + 3) * dim]);
    }
}
