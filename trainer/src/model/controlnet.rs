//! The ControlNet side network: a trainable copy of the main encoder + middle, a hint
//! encoder, and one zero-initialised 1×1 conv per tapped feature.

use lisa_core::backend::Backend;

use super::config::{ControlConfig, HookLayer, UNetConfig};
use super::unet::{Conditioning, Encoder, Residuals, TimeEmbedding};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::Conv2d;
use crate::params::{Bound, ParamStore};

/// What the side network returns: the residuals and the pre-zero-conv features.
#[derive(Debug, Clone)]
pub struct SideOutput<B: Backend> {
    /// After the zero convs: what the main network adds.
    pub residuals: Residuals<B>,
    /// Before the zero convs, per level (`down_i`).
    pub level_features: Vec<Var<B>>,
    /// Before the middle zero conv (`mid`).
    pub mid_feature: Var<B>,
}

impl<B: Backend> SideOutput<B> {
    /// The pre-zero-conv feature of a hook layer.
    pub fn feature(&self, hook: HookLayer) -> Result<&Var<B>> {
        match hook {
            HookLayer::Mid => Ok(&self.mid_feature),
            HookLayer::Down(i) => self.level_features.get(i).ok_or_else(|| {
                TrainError::Config(format!(
                    "hook down_{i} does not exist: the model has levels down_0..down_{}",
                    self.level_features.len() - 1
                ))
            }),
        }
    }
}

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
    /// Parameters under `{name}.` (all trainable); `time` and `encoder` are later copied from
    /// the main network by [`super::DualModel`].
    pub fn new<B: Backend>(s: &mut ParamStore<B>, name: &str, u: &UNetConfig, c: &ControlConfig) -> Result<Self> {
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
        Ok(Self {
            time: TimeEmbedding::new(s, &format!("{name}.time"), u, true)?,
            hint: [
                Conv2d::new(s, &format!("{name}.hint.0"), c.hint_channels, hh, 3, 1, false, true)?,
                Conv2d::new(s, &format!("{name}.hint.1"), hh, hh, 3, 1, false, true)?,
                Conv2d::new(s, &format!("{name}.hint.2"), hh, u.channels[0], 3, 1, true, true)?,
            ],
            encoder: Encoder::new(s, &format!("{name}.encoder"), u, true)?,
            zero_levels: u
                .channels
                .iter()
                .enumerate()
                .map(|(i, &ch)| Conv2d::new(s, &format!("{name}.zero_convs.{i}"), ch, ch, 1, 1, true, true))
                .collect::<Result<_>>()?,
            zero_mid: Conv2d::new(
                s,
                &format!("{name}.zero_mid"),
                *u.channels.last().unwrap_or(&1),
                *u.channels.last().unwrap_or(&1),
                1,
                1,
                true,
                true,
            )?,
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
        let levels =
            enc.levels.iter().zip(&self.zero_levels).map(|(f, z)| z.forward(p, f)).collect::<Result<Vec<_>>>()?;
        let mid = self.zero_mid.forward(p, &enc.mid)?;
        Ok(SideOutput { residuals: Residuals { levels, mid }, level_features: enc.levels, mid_feature: enc.mid })
    }
}
