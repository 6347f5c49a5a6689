//! Helpers shared by the trainer's integration tests.
#![allow(dead_code)]

pub mod golden;

use lisa_trainer::model::toy::{ControlConfig, ToyConfig, UNetConfig};
use lisa_trainer::model::{DecoderConfig, HookLayer, ModelSpec};

/// A tiny dual-branch model (16×16, channels (8, 16)) for fast training tests.
pub fn tiny_model() -> ModelSpec {
    let toy = ToyConfig {
        unet: UNetConfig {
            resolution: 16,
            channels: vec![8, 16],
            norm_groups: 4,
            time_sinusoidal_dim: 16,
            time_dim: 16,
            ..UNetConfig::default()
        },
        control: ControlConfig { hint_hidden: 8, ..ControlConfig::default() },
    };
    toy.to_spec(&DecoderConfig {
        hook: Some(HookLayer::Down(1)),
        time_sinusoidal_dim: 16,
        channel_floor: 4,
        ..DecoderConfig::default()
    })
}

/// A toy spec whose UNet is `unet` (the rest default).
pub fn toy_spec(unet: UNetConfig) -> ModelSpec {
    ToyConfig { unet, ..ToyConfig::default() }.to_spec(&DecoderConfig::default())
}

/// `f(i, item)` for each of `items` on a thread of its own (the ranks of an in-process group,
/// or "processes" meeting over sockets), all running at once; the results in item order.
pub fn on_threads<I: Send, T: Send>(items: Vec<I>, f: impl Fn(usize, I) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items.into_iter().enumerate().map(|(i, item)| s.spawn(move || f(i, item))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
