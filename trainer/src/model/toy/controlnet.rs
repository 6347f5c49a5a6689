//! The ControlNet side network: a trainable copy of the main encoder + middle, a hint
//! encoder, and one zero-initialised 1×1 conv per tapped feature.

use lisa_core::backend::Backend;

use super::config::{ControlConfig, UNetConfig};
use super::unet::{Encoder, TimeEmbedding};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, Residuals, SideOutput};
use crate::nn::{Conv2d, Conv2dConfig};
use crate::params::{Bound, ParamStore, Scope};

/// The side network.
#[derive(Debug, Clone)]
pub struct ControlNet {
    /// Its own time/prompt embedding (a copy of the main one).
    pub time: TimeEmbedding,
    hint: [Conv2d; 3],
    /// Its encoder (a copy of the main one).
    pub encoder: Encoder,
    zero_levels: Vec<Conv2d>,
    zero_mid: Conv2d,
    /// Residual multiplier.
    pub conditioning_scale: f32,
}

impl ControlNet {
    /// Parameters under `at` (all trainable); `time` and `encoder` are later copied from
    /// the main network by [`super::ToyModel`].
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        u: &UNetConfig,
        c: &ControlConfig,
    ) -> Result<Self> {
        let at = at.into();
        if c.hint_channels == 0 || c.hint_hidden == 0 {
            return Err(TrainError::Config("control.hint_channels and hint_hidden must be > 0".into()));
        }
        if !c.conditioning_scale.is_finite() {
            return Err(TrainError::Config(format!(
                "control.conditioning_scale must be finite, got {}",
                c.conditioning_scale
            )));
        }
        let hh = c.hint_hidden;
        let zero_conv = |ch: usize| Conv2dConfig::new(ch, ch, 1).zero_init();
        let deepest = *u.channels.last().unwrap_or(&1);
        let hint = at.pp("hint");
        Ok(Self {
            time: TimeEmbedding::new(s, at.pp("time"), u)?,
            hint: [
                Conv2d::new(s, hint.pp(0), Conv2dConfig::new(c.hint_channels, hh, 3))?,
                Conv2d::new(s, hint.pp(1), Conv2dConfig::new(hh, hh, 3))?,
                Conv2d::new(s, hint.pp(2), Conv2dConfig::new(hh, u.channels[0], 3).zero_init())?,
            ],
            encoder: Encoder::new(s, at.pp("encoder"), u)?,
            zero_levels: u
                .channels
                .iter()
                .enumerate()
                .map(|(i, &ch)| Conv2d::new(s, at.pp("zero_convs").pp(i), zero_conv(ch)))
                .collect::<Result<_>>()?,
            zero_mid: Conv2d::new(s, at.pp("zero_mid"), zero_conv(deepest))?,
            conditioning_scale: c.conditioning_scale,
        })
    }

    /// Runs the side network on `x_t` and the condition image `hint [n, c_hint, r, r]`.
    pub fn forward<B: Backend>(
        &self,
        p: &Bound<'_, B>,
        x_t: &Var<B>,
        hint: &Var<B>,
        cond: &Conditioning,
    ) -> Result<SideOutput<B>> {
        let t = p.tape;
        let temb = self.time.forward(p, cond)?;
        let h = t.silu(&self.hint[0].forward(p, hint)?)?;
        let h = t.silu(&self.hint[1].forward(p, &h)?)?;
        let hint_feature = self.hint[2].forward(p, &h)?;
        let enc = self.encoder.forward(p, x_t, &temb, Some(&hint_feature))?;
        let down = enc.down.iter().zip(&self.zero_levels).map(|(f, z)| z.forward(p, f)).collect::<Result<Vec<_>>>()?;
        let mid = self.zero_mid.forward(p, enc.mid()?)?;
        Ok(SideOutput { residuals: Residuals::unet(down, mid), features: enc })
    }
}
