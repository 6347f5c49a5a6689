//! A tiny training run on wgpu agrees with the CPU backend, step by step
//! ([`lisa_core::tolerance::TRAINING_LOSS_F32`], [`lisa_core::tolerance::TRAINING_PARAMS_F32`]).
//! Without an adapter the test skips with the reason, except under `CI=true`.
#![cfg(feature = "wgpu")]

mod common;

use common::tiny_model;
use lisa_core::backend::prelude::*;
use lisa_core::tolerance::{TRAINING_LOSS_F32, TRAINING_PARAMS_F32};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

const STEPS: usize = 4;

/// Losses of `STEPS` LISA steps and the trained parameters afterwards (by name).
fn run<B: Backend>(device: B::Device) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let model = registry::build::<B>(&tiny_model(), Parts::Dual { decoder: true }, device, 11).unwrap();
    let cfg = TrainConfig {
        seed: 11,
        batch_size: 4,
        max_train_steps: STEPS as u64,
        mode: Mode::Lisa,
        optim: OptimConfig { lr: 1e-3, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    let mut t = Trainer::new(model, cfg).unwrap();
    let data = FillCircles { resolution: 16, len: 64, seed: 5 };
    let losses = (0..STEPS).map(|_| t.step(&data).unwrap().loss).collect();
    let params = t
        .model
        .store()
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| (p.name.clone(), B::to_vec(&p.value).unwrap()))
        .collect();
    (losses, params)
}

#[test]
fn wgpu_training_matches_cpu() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    let device = lisa_cubecl::WgpuBackend::probe().unwrap();
    let (cpu_losses, cpu_params) = run::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice);
    let (gpu_losses, gpu_params) = run::<lisa_cubecl::WgpuBackend>(device);
    for (i, (a, b)) in cpu_losses.iter().zip(&gpu_losses).enumerate() {
        assert!(TRAINING_LOSS_F32.accepts(*b as f64, *a as f64), "step {}: cpu loss {a}, wgpu loss {b}", i + 1);
    }
    assert_eq!(cpu_params.len(), gpu_params.len());
    let mut worst = (0.0f64, String::new());
    for ((name, a), (name_b, b)) in cpu_params.iter().zip(&gpu_params) {
        assert_eq!(name, name_b);
        for (x, y) in a.iter().zip(b) {
            let d = (*x as f64 - *y as f64).abs();
            if d > worst.0 {
                worst = (d, name.clone());
            }
            assert!(TRAINING_PARAMS_F32.accepts(*y as f64, *x as f64), "{name}: cpu {x}, wgpu {y}");
        }
    }
    eprintln!(
        "cpu vs wgpu over {STEPS} steps: losses {cpu_losses:?} vs {gpu_losses:?}; largest parameter gap {:.2e} ({})",
        worst.0, worst.1
    );
}
