//! diffusers' `ControlNetModel`: a copy of the UNet's encoder (`conv_in`, time embedding,
//! down and middle blocks) reading `x_t + cond_embedding(c)`, with one zero 1×1 conv per
//! UNet skip (`controlnet_down_blocks.{i}`) and one for the middle (`controlnet_mid_block`).

use lisa_core::backend::Backend;

use super::blocks::{DownBlock, MidBlock};
use super::config::{ControlNetExtras, UNetConfig};
use super::text_time::{AddedConditions, TimeConditioning};
use super::unet::{check_input, encoder_parts};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::{SideOutput, Skips};
use crate::nn::{Conv2d, Conv2dConfig};
use crate::params::{Bound, ParamStore, Scope};

/// `ControlNetConditioningEmbedding`: `conv_in`, pairs of 3×3 convs (stride 1, then 2) over
/// `conditioning_embedding_out_channels`, each followed by SiLU, and a zero `conv_out` to
/// `block_out_channels[0]`. Downsamples by `2^(stages − 1)` (8 for SD).
#[derive(Debug, Clone)]
pub struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    /// `{conv_in, blocks.*, conv_out}` under `at`.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c_img: usize,
        extras: &ControlNetExtras,
        c0: usize,
    ) -> Result<Self> {
        let at = at.into();
        let ch = &extras.conditioning_embedding_out_channels;
        let (mut blocks, block) = (Vec::new(), at.pp("blocks"));
        for i in 0..ch.len() - 1 {
            blocks.push(Conv2d::new(s, block.pp(2 * i), Conv2dConfig::new(ch[i], ch[i], 3))?);
            let down = Conv2dConfig::new(ch[i], ch[i + 1], 3).stride(2);
            blocks.push(Conv2d::new(s, block.pp(2 * i + 1), down)?);
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: Conv2d::new(s, at.pp("conv_in"), Conv2dConfig::new(c_img, ch[0], 3))?,
            blocks,
            conv_out: Conv2d::new(s, at.pp("conv_out"), Conv2dConfig::new(last, c0, 3).zero_init())?,
        })
    }

    /// `c [n, c_img, 8h, 8w] → [n, c₀, h, w]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, c: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let mut h = t.silu(&self.conv_in.forward(p, c)?)?;
        for b in &self.blocks {
            h = t.silu(&b.forward(p, &h)?)?;
        }
        self.conv_out.forward(p, &h)
    }

    /// The factor between the condition image's side and the latent's.
    pub fn downscale(&self) -> usize {
        1 << (self.blocks.len() / 2)
    }
}

/// The ControlNet.
#[derive(Debug, Clone)]
pub struct SdControlNet {
    time: TimeConditioning,
    conv_in: Conv2d,
    cond_embedding: ConditioningEmbedding,
    down: Vec<DownBlock>,
    mid: MidBlock,
    zero_convs: Vec<Conv2d>,
    zero_mid: Conv2d,
    config: UNetConfig,
    extras: ControlNetExtras,
}

impl SdControlNet {
    /// Parameters under `at` with diffusers' names; the zero convs and the condition
    /// embedding's `conv_out` start at zero.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        u: &UNetConfig,
        extras: &ControlNetExtras,
    ) -> Result<Self> {
        let at = at.into();
        let (conv_in, time, down, mid) = encoder_parts(s, &at, u)?;
        let c0 = u.block_out_channels[0];
        let cond_embedding = ConditioningEmbedding::new(
            s,
            at.pp("controlnet_cond_embedding"),
            extras.conditioning_channels,
            extras,
            c0,
        )?;
        // One zero conv per skip, at the skip's width.
        let mut widths = vec![c0];
        for (i, &c) in u.block_out_channels.iter().enumerate() {
            widths.extend(std::iter::repeat_n(c, u.layers_per_block));
            if i + 1 < u.block_out_channels.len() {
                widths.push(c);
            }
        }
        let zero_convs = widths
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                Conv2d::new(s, at.pp("controlnet_down_blocks").pp(i), Conv2dConfig::new(c, c, 1).zero_init())
            })
            .collect::<Result<Vec<_>>>()?;
        let c_mid = *u.block_out_channels.last().expect("validated non-empty");
        let zero_mid = Conv2d::new(s, at.pp("controlnet_mid_block"), Conv2dConfig::new(c_mid, c_mid, 1).zero_init())?;
        Ok(Self {
            time,
            conv_in,
            cond_embedding,
            down,
            mid,
            zero_convs,
            zero_mid,
            config: u.clone(),
            extras: extras.clone(),
        })
    }

    /// `x [n, c_in, h, w]`, condition image `c [n, c_img, f·h, f·w]`, `t [n]`, text
    /// `context` and, for SDXL, the added conditions → the residuals (before any conditioning scale) and the pre-zero-conv
    /// features (`down_i` = the input of `controlnet_down_blocks[i]`, `mid`).
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        c: &Var<B>,
        t: &[f32],
        context: &Var<B>,
        added: Option<&AddedConditions>,
    ) -> Result<SideOutput<B>> {
        check_input::<B>(&self.config, x, t, context)?;
        let (xs, cs) = (B::shape(&x.value), B::shape(&c.value));
        let f = self.cond_embedding.downscale();
        let want = [xs.dims()[0], self.extras.conditioning_channels, f * xs.dims()[2], f * xs.dims()[3]];
        if cs.dims() != want {
            return Err(TrainError::Mismatch(format!(
                "condition image {cs}: expected {want:?} ({f}x the latent side)"
            )));
        }
        let tape = p.tape;
        let temb = self.time.forward(p, t, added, &B::device(&x.value))?;
        let h = tape.add(&self.conv_in.forward(p, x)?, &self.cond_embedding.forward(p, c)?)?;
        let mut features = vec![h.clone()];
        let mut h = h;
        for block in &self.down {
            h = block.forward(p, &h, &temb, context, &mut features)?;
        }
        let mid = self.mid.forward(p, &h, &temb, context)?;
        let down = features.iter().zip(&self.zero_convs).map(|(f, z)| z.forward(p, f)).collect::<Result<Vec<_>>>()?;
        let residuals = Skips::unet(down, self.zero_mid.forward(p, &mid)?);
        Ok(SideOutput { residuals, features: Skips::unet(features, mid) })
    }
}
