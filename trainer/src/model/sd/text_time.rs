//! SDXL's added conditioning (`addition_embed_type = "text_time"` in diffusers'
//! `UNet2DConditionModel` and `ControlNetModel`):
//! `aug = add_embedding([pooled ‖ sin(time_ids)])`, `temb = silu(time_embedding(sin(t)) + aug)`,
//! where `sin(time_ids)` is each of the six micro-conditioning ids (original size, crop
//! top-left, target size) through `add_time_proj`, diffusers' `Timesteps` of width
//! `addition_time_embed_dim` with the UNet's `flip_sin_to_cos` and `freq_shift`.

use lisa_core::backend::{Backend, DType, Shape};

use super::blocks::{TimeEmbedding, timestep_embedding};
use super::config::{TIME_IDS, TextTimeConfig, UNetConfig};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::Linear;
use crate::params::{Bound, ParamStore, Scope};

/// What a batch adds to the time embedding, on the host: the pooled text embedding and the
/// six ids of every sample.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedConditions {
    /// `[n, pooled_dim]` row-major (diffusers' `text_embeds`).
    pub text_embeds: Vec<f32>,
    /// `[n, 6]` row-major (diffusers' `time_ids`).
    pub time_ids: Vec<f32>,
}

/// `add_embedding.linear_{1,2}`: `linear_2(silu(linear_1(·)))`, `input_dim → 4·c₀ → 4·c₀`.
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    config: TextTimeConfig,
    flip_sin_to_cos: bool,
    freq_shift: usize,
}

impl TextTimeEmbedding {
    /// `linear_{1,2}` under `at` (`…add_embedding`).
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        u: &UNetConfig,
        config: TextTimeConfig,
    ) -> Result<Self> {
        let at = at.into();
        let temb = 4 * u.block_out_channels[0];
        Ok(Self {
            linear_1: Linear::new(s, at.pp("linear_1"), config.input_dim, temb)?,
            linear_2: Linear::new(s, at.pp("linear_2"), temb, temb)?,
            config,
            flip_sin_to_cos: u.flip_sin_to_cos,
            freq_shift: u.freq_shift,
        })
    }

    /// `aug [n, 4·c₀]` of a batch of `n`; inputs of other sizes or non-finite ids are errors.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        added: &AddedConditions,
        n: usize,
        device: &B::Device,
    ) -> Result<Var<B>> {
        let (pooled, d) = (self.config.pooled_dim(), self.config.time_embed_dim);
        if added.text_embeds.len() != n * pooled || added.time_ids.len() != n * TIME_IDS {
            return Err(TrainError::Mismatch(format!(
                "added conditions of {} pooled values and {} time ids: the UNet reads [{n}, {pooled}] and [{n}, {TIME_IDS}]",
                added.text_embeds.len(),
                added.time_ids.len()
            )));
        }
        if added.time_ids.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Mismatch("the time ids hold NaN or infinite values".into()));
        }
        // [n·6, d] sinusoids, read as [n, 6·d]: the ids of a sample side by side.
        let sin = timestep_embedding(&added.time_ids, d, self.flip_sin_to_cos, self.freq_shift);
        // [n, pooled + 6·d] = [text_embeds ‖ time embeds]
        let width = self.config.input_dim;
        let mut input = Vec::with_capacity(n * width);
        for (text, ids) in added.text_embeds.chunks(pooled).zip(sin.chunks(TIME_IDS * d)) {
            input.extend_from_slice(text);
            input.extend_from_slice(ids);
        }
        let input = B::from_slice(&input, &Shape::new([n, width]), DType::F32, device)?;
        let tape = p.tape;
        let h = tape.silu(&self.linear_1.forward(p, &tape.constant(input))?)?;
        self.linear_2.forward(p, &h)
    }
}

/// The time embedding every resnet reads, with SDXL's added embedding where the UNet has one
/// (`time_embedding`, `add_embedding`).
#[derive(Debug, Clone)]
pub struct TimeConditioning {
    time: TimeEmbedding,
    added: Option<TextTimeEmbedding>,
}

impl TimeConditioning {
    /// `time_embedding.*` and, for `text_time`, `add_embedding.*` under the model's scope `at`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: &Scope, u: &UNetConfig) -> Result<Self> {
        let time = TimeEmbedding::new(s, at.pp("time_embedding"), u)?;
        let added = match u.text_time {
            Some(config) => Some(TextTimeEmbedding::new(s, at.pp("add_embedding"), u, config)?),
            None => None,
        };
        Ok(Self { time, added })
    }

    /// `silu(temb) [n, 4·c₀]` for timesteps `t [n]`; `added` must be given exactly when the
    /// UNet has `text_time`.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        t: &[f32],
        added: Option<&AddedConditions>,
        device: &B::Device,
    ) -> Result<Var<B>> {
        let aug = match (&self.added, added) {
            (None, None) => None,
            (Some(e), Some(a)) => Some(e.forward(p, a, t.len(), device)?),
            (Some(_), None) => {
                return Err(TrainError::Mismatch(
                    "this UNet (addition_embed_type \"text_time\") reads pooled text embeddings and time ids; none were given".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(TrainError::Mismatch(
                    "pooled text embeddings and time ids were given to a UNet without addition_embed_type \"text_time\"".into(),
                ));
            }
        };
        self.time.forward(p, t, aug.as_ref(), device)
    }
}
