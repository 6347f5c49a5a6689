use lisa_core::Prediction;
use lisa_core::backend::GroupNormParams;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::nn::ResBlockConfig;

/// The main (prior) UNet, in pixel space. Defaults: the reference toy configuration
/// (32×32 RGB, channels (32, 64, 64), one ResBlock per level + a middle ResBlock,
/// GroupNorm(8), time MLP 64 → 128 → 128, two prompt embeddings of 8 colours + null).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    /// Image channels (3).
    pub image_channels: usize,
    /// Image side (32).
    pub resolution: usize,
    /// Channels per level, full resolution first; each further level halves the resolution.
    pub channels: Vec<usize>,
    /// GroupNorm groups (8).
    pub norm_groups: usize,
    /// GroupNorm ε.
    pub norm_eps: f32,
    /// Width of the sinusoidal timestep features (64).
    pub time_sinusoidal_dim: usize,
    /// Width of the time embedding (128).
    pub time_dim: usize,
    /// Ids per prompt embedding, null id (the last) included: (9, 9) = circle colour,
    /// background colour, 8 colours each.
    pub prompt_classes: Vec<usize>,
    /// Self-attention in the middle block (lowest resolution).
    pub attention: bool,
    /// What the network predicts.
    pub prediction: Prediction,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            image_channels: 3,
            resolution: 32,
            channels: vec![32, 64, 64],
            norm_groups: 8,
            norm_eps: 1e-5,
            time_sinusoidal_dim: 64,
            time_dim: 128,
            prompt_classes: vec![9, 9],
            attention: false,
            prediction: Prediction::Epsilon,
        }
    }
}

impl UNetConfig {
    /// Checks sizes: ≥ 1 level, the resolution divisible by 2^(levels−1), nonzero widths.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(TrainError::Config(m));
        if self.channels.is_empty() || self.channels.len() > 16 || self.channels.contains(&0) {
            return fail(format!("unet.channels must list 1 to 16 nonzero widths, got {:?}", self.channels));
        }
        let factor = 1usize << (self.channels.len() - 1);
        if self.resolution == 0 || !self.resolution.is_multiple_of(factor) {
            return fail(format!("unet.resolution {} must be divisible by 2^(levels-1) = {factor}", self.resolution));
        }
        if self.image_channels == 0 || self.time_dim == 0 || self.time_sinusoidal_dim < 2 || self.norm_groups == 0 {
            return fail("unet widths, time dims and norm_groups must be > 0".into());
        }
        if self.prompt_classes.contains(&0) {
            return fail("every prompt embedding needs at least one id".into());
        }
        const MAX_SIDE: usize = 8192;
        const MAX_WIDTH: usize = 1 << 16;
        if self.resolution > MAX_SIDE {
            return fail(format!("unet.resolution {} is larger than {MAX_SIDE}", self.resolution));
        }
        let widths = [self.image_channels, self.time_dim, self.time_sinusoidal_dim];
        if widths.iter().chain(&self.channels).chain(&self.prompt_classes).any(|&w| w > MAX_WIDTH) {
            return fail(format!("unet widths, time dims and prompt classes must be at most {MAX_WIDTH}"));
        }
        Ok(())
    }

    /// Resolution at level `i`.
    pub fn level_resolution(&self, i: usize) -> usize {
        self.resolution >> i
    }

    /// Its group norms.
    pub fn norm(&self) -> GroupNormParams {
        GroupNormParams { groups: self.norm_groups, eps: self.norm_eps }
    }

    /// A residual block `c_in → c_out` reading the time embedding.
    pub fn res_block(&self, in_channels: usize, out_channels: usize) -> ResBlockConfig {
        ResBlockConfig { in_channels, out_channels, time_dim: self.time_dim, norm: self.norm() }
    }
}

/// The ControlNet side network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Channels of the condition image (1: an outline).
    pub hint_channels: usize,
    /// Width of the hint encoder's hidden convs (16).
    pub hint_hidden: usize,
    /// Multiplies every residual before it is added (1.0).
    pub conditioning_scale: f32,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { hint_channels: 1, hint_hidden: 16, conditioning_scale: 1.0 }
    }
}
