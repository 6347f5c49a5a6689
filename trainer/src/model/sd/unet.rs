//! diffusers' `UNet2DConditionModel` (SD 1.x/2.x), split where a ControlNet enters it:
//! [`SdUNet::encode`] (time embedding, `conv_in`, down blocks, middle block) and
//! [`SdUNet::decode`] (residuals added to the skips and the middle, up blocks, output).

use lisa_core::backend::{Backend, DType, GroupNormParams};

use super::blocks::{DownBlock, MidBlock, UpBlock};
use super::config::UNetConfig;
use super::text_time::{AddedConditions, TimeConditioning};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::Skips;
use crate::nn::{Conv2d, Conv2dConfig, GroupNorm};
use crate::params::{Bound, ParamStore, Scope};

/// What the encoder hands the decoder.
#[derive(Debug, Clone)]
pub struct Encoded<B: Backend> {
    /// `silu(temb) [n, 4·c₀]`.
    pub temb: Var<B>,
    /// The skips (`conv_in`, every resnet(+transformer), every downsampler) and the middle
    /// block's output.
    pub skips: Skips<B>,
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct SdUNet {
    time: TimeConditioning,
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl SdUNet {
    /// Parameters under `at` with diffusers' names (`conv_in`, `time_embedding`,
    /// `down_blocks`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, u: &UNetConfig) -> Result<Self> {
        let at = at.into();
        let c0 = u.block_out_channels[0];
        let (conv_in, time, down, mid) = encoder_parts(s, &at, u)?;
        let up = (0..u.up_block_types.len())
            .map(|i| UpBlock::new(s, at.pp("up_blocks").pp(i), i, u))
            .collect::<Result<Vec<_>>>()?;
        let norm = GroupNormParams { groups: u.norm_num_groups, eps: u.norm_eps };
        Ok(Self {
            time,
            conv_in,
            down,
            mid,
            up,
            norm_out: GroupNorm::new(s, at.pp("conv_norm_out"), c0, norm)?,
            conv_out: Conv2d::new(s, at.pp("conv_out"), Conv2dConfig::new(c0, u.out_channels, 3))?,
            config: u.clone(),
        })
    }

    /// `x [n, c_in, h, w]` (sides divisible by `2^(levels − 1)`), timesteps `t [n]`, text
    /// `context [n, s, d_ctx]` and, for SDXL, the added conditions → the encoding.
    pub fn encode<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x: &Var<B>,
        t: &[f32],
        context: &Var<B>,
        added: Option<&AddedConditions>,
    ) -> Result<Encoded<B>> {
        check_input::<B>(&self.config, x, t, context)?;
        let temb = self.time.forward(p, t, added, &B::device(&x.value))?;
        let mut skips = Vec::with_capacity(self.config.skip_count());
        let h = self.conv_in.forward(p, x)?;
        skips.push(h.clone());
        let mut h = h;
        for block in &self.down {
            h = block.forward(p, &h, &temb, context, &mut skips)?;
        }
        let mid = self.mid.forward(p, &h, &temb, context)?;
        Ok(Encoded { temb, skips: Skips::unet(skips, mid) })
    }

    /// The decoder over `enc`, adding `scale·residuals` to the skips and the middle output
    /// when given (diffusers' `down_block_additional_residuals`, `mid_block_additional_residual`).
    pub fn decode<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        enc: &Encoded<B>,
        context: &Var<B>,
        residuals: Option<(&Skips<B>, f32)>,
    ) -> Result<Var<B>> {
        let t = p.tape;
        let (mut skips, mut h) = (enc.skips.down.clone(), enc.skips.mid()?.clone());
        if let Some((r, scale)) = residuals {
            if r.down.len() != skips.len() {
                return Err(TrainError::Mismatch(format!(
                    "{} down residuals for {} UNet skips",
                    r.down.len(),
                    skips.len()
                )));
            }
            // Residuals (f32, from the ControlNet) in the skips' storage type.
            for (s, res) in skips.iter_mut().zip(&r.down) {
                let res = t.cast(&scaled(t, res, scale)?, B::dtype(&s.value))?;
                *s = t.add(s, &res)?;
            }
            let res = t.cast(&scaled(t, r.mid()?, scale)?, B::dtype(&h.value))?;
            h = t.add(&h, &res)?;
        }
        for block in &self.up {
            let k = block.skips();
            let rest =
                skips.len().checked_sub(k).ok_or(TrainError::Internal("up blocks consume more skips than exist"))?;
            h = block.forward(p, &h, &skips[rest..], &enc.temb, context)?;
            skips.truncate(rest);
        }
        let h = self.norm_out.forward_silu(p, &h)?;
        // The prediction in f32 whatever the UNet's storage type (losses, samplers).
        t.cast(&self.conv_out.forward(p, &h)?, DType::F32)
    }
}

fn scaled<B: Backend>(t: &crate::autodiff::Tape<B>, v: &Var<B>, scale: f32) -> Result<Var<B>> {
    if scale == 1.0 { Ok(v.clone()) } else { t.scale(v, scale) }
}

/// The parts a UNet and its ControlNet share, under `at`: `conv_in`, the time
/// embedding (with SDXL's added one), the down blocks and the middle block.
pub(super) fn encoder_parts<B: Backend>(
    s: &mut ParamStore<B>,
    at: &Scope,
    u: &UNetConfig,
) -> Result<(Conv2d, TimeConditioning, Vec<DownBlock>, MidBlock)> {
    let c0 = u.block_out_channels[0];
    let conv_in = Conv2d::new(s, at.pp("conv_in"), Conv2dConfig::new(u.in_channels, c0, 3))?;
    let time = TimeConditioning::new(s, at, u)?;
    let mut down = Vec::with_capacity(u.down_block_types.len());
    let mut c_in = c0;
    for i in 0..u.down_block_types.len() {
        down.push(DownBlock::new(s, at.pp("down_blocks").pp(i), i, c_in, u)?);
        c_in = u.block_out_channels[i];
    }
    let mid = MidBlock::new(s, at.pp("mid_block"), u)?;
    Ok((conv_in, time, down, mid))
}

/// Input checks shared by the UNet and the ControlNet, before any work.
pub(super) fn check_input<B: Backend>(u: &UNetConfig, x: &Var<B>, t: &[f32], context: &Var<B>) -> Result<()> {
    let s = B::shape(&x.value);
    let factor = 1usize << (u.block_out_channels.len() - 1);
    if s.rank() != 4 || s.dims()[1] != u.in_channels {
        return Err(TrainError::Mismatch(format!("latents {s}: expected [n, {}, h, w]", u.in_channels)));
    }
    let (n, h, w) = (s.dims()[0], s.dims()[2], s.dims()[3]);
    if h == 0 || w == 0 || !h.is_multiple_of(factor) || !w.is_multiple_of(factor) {
        return Err(TrainError::Mismatch(format!("latent sides {h}x{w} must be positive multiples of {factor}")));
    }
    if t.len() != n {
        return Err(TrainError::Mismatch(format!("{} timesteps for a batch of {n}", t.len())));
    }
    let c = B::shape(&context.value);
    if c.rank() != 3 || c.dims()[0] != n || c.dims()[2] != u.cross_attention_dim || c.dims()[1] == 0 {
        return Err(TrainError::Mismatch(format!(
            "text embeddings {c}: expected [{n}, tokens, {}]",
            u.cross_attention_dim
        )));
    }
    Ok(())
}
