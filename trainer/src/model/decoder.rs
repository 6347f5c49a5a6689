//! The LISA decoder (docs/method.md §3.6): reads the side network's pre-zero-conv feature
//! `h [n, C, r, r]` and predicts the likelihood term at the model output's shape.
//!
//! `D(h, t) = zero_conv(stages(silu(h + W·sin₂₅₆(t))))`, with `k = log₂(out_res / r)` stages
//! of `[conv (1×1 if C ≥ 512 else 3×3) → SiLU → nearest ×2]`, channels halved each stage
//! down to a floor; one `3×3 conv → SiLU` when `k = 0`; the last conv is zero-initialised
//! (the paper's choice, so `D ≡ 0` at step 0; [`OutputInit`] offers LeCun-normal instead). It
//! exists only for training: inference never builds it.
//!
//! On a transformer's side network the hooked feature is image tokens `h [n, g·g, C]` (one
//! per `p×p` latent patch), and the decoder works token-wise back to latent patches:
//! `D(h, t) = unpatchify(proj_out(silu(stages.0(silu(h + W·sin₂₅₆(t))))))`, `stages.0` halving
//! the width down to the floor, `proj_out` to `p·p·c` per token (zero-initialised likewise).

use lisa_core::backend::{Backend, DType, Shape};

use serde::{Deserialize, Serialize};

use super::HookLayer;
use super::sd3::unpatchify;
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::{Conv2d, Conv2dConfig, Linear, sinusoidal_embedding};
use crate::params::{Bound, ParamStore, Scope};

/// The LISA decoder (docs/method.md §3.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecoderConfig {
    /// The hooked side layer (None: the architecture's default, its `DEFAULT_HOOK`, which the
    /// registry lists: `down_1` in the toy, `down_5` in Stable Diffusion).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookLayer>,
    /// Width of the decoder's sinusoidal time features (256).
    pub time_sinusoidal_dim: usize,
    /// Channel floor of the upsampling stages (64 in the paper; scaled down to 16 here).
    pub channel_floor: usize,
    /// How the output convolution starts (zero, as in the paper).
    pub output_init: OutputInit,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { hook: None, time_sinusoidal_dim: 256, channel_floor: 16, output_init: OutputInit::Zero }
    }
}

impl DecoderConfig {
    /// The hook, `default` (the architecture's) when none was chosen.
    pub fn hook_or(&self, default: HookLayer) -> HookLayer {
        self.hook.unwrap_or(default)
    }

    /// This configuration with the hook chosen: `default` when none was.
    pub fn resolved(&self, default: HookLayer) -> Self {
        Self { hook: Some(self.hook_or(default)), ..self.clone() }
    }
}

/// The initial weights of the decoder's output convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputInit {
    /// Zero weights and bias: `D ≡ 0` at step 0, and the gradient reaching the side network
    /// through the decoder is zero until the output convolution has grown (the paper).
    #[default]
    Zero,
    /// LeCun-normal weights, zero bias, like the decoder's other convolutions: the side
    /// network receives LISA's gradient from the first step.
    LecunNormal,
}

/// The decoder.
#[derive(Debug, Clone)]
pub struct LisaDecoder {
    /// Its configuration.
    pub config: DecoderConfig,
    time_proj: Linear,
    /// The hooked feature's width `C`.
    width: usize,
    body: Body,
}

/// What follows the time embedding: convolutions over a feature map, or linears over tokens.
#[derive(Debug, Clone)]
enum Body {
    /// A UNet side network's feature map `[n, C, r, r]`: the upsampling stages (each with
    /// whether a ×2 upsampling follows it) and the output convolution.
    Convs { stages: Vec<(Conv2d, bool)>, out: Conv2d },
    /// A transformer side network's tokens `[n, g·g, C]`: one hidden linear, the output
    /// linear to `patch·patch·channels`, then the unpatchify.
    Tokens { hidden: Linear, out: Linear, patch: usize, channels: usize },
}

impl LisaDecoder {
    /// For a hooked feature of `c_h` channels at side `r_h`, decoding to `[out_channels,
    /// out_res, out_res]` (the model output); parameters under `at`.
    pub fn new<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &DecoderConfig,
        (c_h, r_h): (usize, usize),
        (out_channels, out_res): (usize, usize),
    ) -> Result<Self> {
        let at = at.into();
        if r_h == 0 || !out_res.is_multiple_of(r_h) || !(out_res / r_h).is_power_of_two() {
            return Err(TrainError::Config(format!(
                "hook resolution {r_h} does not divide the output resolution {out_res} by a power of two"
            )));
        }
        if c.time_sinusoidal_dim < 2 || c.channel_floor == 0 {
            return Err(TrainError::Config("decoder.time_sinusoidal_dim must be >= 2 and channel_floor > 0".into()));
        }
        let k = (out_res / r_h).trailing_zeros() as usize;
        let (mut stages, stage) = (Vec::new(), at.pp("stages"));
        let mut ch = c_h;
        if k == 0 {
            stages.push((Conv2d::new(s, stage.pp(0), Conv2dConfig::new(ch, ch, 3))?, false));
        }
        for i in 0..k {
            let next = (ch / 2).max(c.channel_floor.min(ch));
            let kernel = if i == 0 && ch >= 512 { 1 } else { 3 };
            stages.push((Conv2d::new(s, stage.pp(i), Conv2dConfig::new(ch, next, kernel))?, true));
            ch = next;
        }
        let out = Conv2dConfig::new(ch, out_channels, 3);
        let out = if c.output_init == OutputInit::Zero { out.zero_init() } else { out };
        Ok(Self {
            config: c.clone(),
            time_proj: Linear::new(s, at.pp("time_proj"), c.time_sinusoidal_dim, c_h)?,
            width: c_h,
            body: Body::Convs { stages, out: Conv2d::new(s, at.pp("conv_out"), out)? },
        })
    }

    /// For hooked tokens `c_h` wide, each standing for a `patch × patch` latent patch of
    /// `out_channels` channels (a transformer side network); parameters under `at`.
    pub fn for_tokens<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &DecoderConfig,
        c_h: usize,
        (patch, out_channels): (usize, usize),
    ) -> Result<Self> {
        let at = at.into();
        if c.time_sinusoidal_dim < 2 || c.channel_floor == 0 || c_h == 0 || patch == 0 || out_channels == 0 {
            return Err(TrainError::Config(
                "decoder.time_sinusoidal_dim must be >= 2, channel_floor > 0, and the tokens, patch and channels non-empty"
                    .into(),
            ));
        }
        let hidden_width = (c_h / 2).max(c.channel_floor.min(c_h));
        let hidden = Linear::new(s, at.pp("stages").pp(0), c_h, hidden_width)?;
        let out_width = patch * patch * out_channels;
        let out = if c.output_init == OutputInit::Zero {
            let at = at.pp("proj_out");
            Linear {
                weight: s.add(at.name("weight"), &[out_width, hidden_width], crate::params::Init::Zeros)?,
                bias: Some(s.add(at.name("bias"), &[out_width], crate::params::Init::Zeros)?),
            }
        } else {
            Linear::new(s, at.pp("proj_out"), hidden_width, out_width)?
        };
        Ok(Self {
            config: c.clone(),
            time_proj: Linear::new(s, at.pp("time_proj"), c.time_sinusoidal_dim, c_h)?,
            width: c_h,
            body: Body::Tokens { hidden, out, patch, channels: out_channels },
        })
    }

    /// `h [n, C, r, r]` (or tokens `[n, g·g, C]`), timesteps `t [n]` → `[n, c_img, R, R]` (f32).
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, h: &Var<B>, t: &[f32]) -> Result<Var<B>> {
        let tape = p.tape;
        let s = B::shape(&h.value);
        let tokens = matches!(self.body, Body::Tokens { .. });
        let rank = if tokens { 3 } else { 4 };
        // The feature's width: channels of a map, the last axis of tokens.
        let width = if tokens { s.dims().last() } else { s.dims().get(1) };
        if s.rank() != rank || s.dims()[0] != t.len() || width != Some(&self.width) {
            return Err(TrainError::Mismatch(format!(
                "the LISA decoder reads {} {} wide for {} timesteps, got {s}",
                if tokens { "tokens [n, g·g, C]" } else { "a feature map [n, C, r, r]" },
                self.width,
                t.len()
            )));
        }
        let (n, c) = (t.len(), self.width);
        let dim = self.config.time_sinusoidal_dim;
        let device = B::device(&h.value);
        let sin = B::from_slice(&sinusoidal_embedding(t, dim), &Shape::new([n, dim]), DType::F32, &device)?;
        let e = self.time_proj.forward(p, &tape.constant(sin))?;
        let (stages, out) = match &self.body {
            Body::Convs { stages, out } => (stages, out),
            Body::Tokens { hidden, out, patch, channels } => {
                // [n, g·g, C] + [n, 1, C] → [n, g·g, p·p·c] → [n, c, g·p, g·p]
                let e = tape.reshape(&e, &Shape::new([n, 1, c]))?;
                let x = tape.silu(&tape.add(h, &e)?)?;
                let x = tape.silu(&hidden.forward(p, &x)?)?;
                let x = unpatchify(tape, &out.forward(p, &x)?, *patch, *channels)?;
                return tape.cast(&x, DType::F32);
            }
        };
        let e = tape.reshape(&e, &Shape::new([n, c, 1, 1]))?;
        let mut x = tape.silu(&tape.add(h, &e)?)?;
        // A stage's ×2 upsampling runs inside the convolution that follows it.
        let conv_after = |conv: &Conv2d, x: &Var<B>, upsampled: bool| {
            if upsampled { conv.forward_upsampled(p, x) } else { conv.forward(p, x) }
        };
        let mut upsample_pending = false;
        for (conv, upsample) in stages {
            x = tape.silu(&conv_after(conv, &x, upsample_pending)?)?;
            upsample_pending = *upsample;
        }
        // f32 for the LISA loss, whatever autocast computed the convolutions in.
        tape.cast(&conv_after(out, &x, upsample_pending)?, DType::F32)
    }
}
