//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

use lisa_trainer::model::{HookLayer, ModelConfig, UNetConfig};

/// A tiny dual-branch model (16×16, channels (8, 16)) for fast training tests.
pub fn tiny_model() -> ModelConfig {
    let mut c = ModelConfig {
        unet: UNetConfig {
            resolution: 16,
            channels: vec![8, 16],
            norm_groups: 4,
            time_sinusoidal_dim: 16,
            time_dim: 16,
            ..UNetConfig::default()
        },
        ..ModelConfig::default()
    };
    c.control.hint_hidden = 8;
    c.decoder.hook = HookLayer::Down(1);
    c.decoder.time_sinusoidal_dim = 16;
    c.decoder.channel_floor = 4;
    c
}
