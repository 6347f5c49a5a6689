//! The same generic training code on two backends, chosen by type.
//!
//! `train::<B>()` knows nothing of CPUs or GPUs: it builds a tiny dual-branch model on
//! `B`, trains the side branch with LISA for a few steps and returns the losses. `main`
//! runs it on lisa-cpu and, when built with `--features wgpu` (or `cuda`) and a device is
//! present, on lisa-cubecl, and prints both loss curves side by side.
//!
//! ```text
//! cargo run --release -p lisa-examples --example swap_backends --features wgpu
//! ```

use std::time::Instant;

use lisa_core::backend::Backend;
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::toy::{ToyConfig, UNetConfig};
use lisa_trainer::model::{DecoderConfig, Parts, registry};
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

/// Five LISA steps of a 16×16 model on backend `B`; returns the losses.
fn train<B: Backend>(device: B::Device) -> Result<Vec<f32>, lisa_trainer::TrainError> {
    let toy = ToyConfig {
        unet: UNetConfig { resolution: 16, channels: vec![16, 32], ..UNetConfig::default() },
        ..ToyConfig::default()
    };
    let model =
        registry::build::<B>(&toy.to_spec(&DecoderConfig::default()), Parts::Dual { decoder: true }, device, 7)?;
    let mut trainer =
        Trainer::new(model, TrainConfig { seed: 7, batch_size: 8, mode: Mode::Lisa, ..TrainConfig::default() })?;
    let data = FillCircles { resolution: 16, len: 256, seed: 1 };
    (0..5).map(|_| trainer.step(&data).map(|s| s.loss)).collect()
}

fn report<B: Backend>(device: B::Device) -> Option<Vec<f32>> {
    let start = Instant::now();
    match train::<B>(device) {
        Ok(losses) => {
            println!(
                "{:>6}: {} steps in {:.2} s, losses {losses:.5?}",
                B::name(),
                losses.len(),
                start.elapsed().as_secs_f64()
            );
            Some(losses)
        }
        Err(e) => {
            println!("{:>6}: failed: {e}", B::name());
            None
        }
    }
}

fn main() {
    let cpu = report::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice);
    #[cfg(feature = "wgpu")]
    match lisa_cubecl::WgpuBackend::probe() {
        Ok(device) => {
            if let (Some(a), Some(b)) = (&cpu, report::<lisa_cubecl::WgpuBackend>(device)) {
                let worst = a.iter().zip(b).map(|(x, y)| ((x - y) / x).abs()).fold(0.0f32, f32::max);
                println!("largest relative loss difference cpu vs wgpu: {worst:.2e}");
            }
        }
        Err(e) => println!("  wgpu: skipped ({e})"),
    }
    #[cfg(feature = "cuda")]
    match lisa_cubecl::CudaBackend::probe() {
        Ok(device) => {
            report::<lisa_cubecl::CudaBackend>(device);
        }
        Err(e) => println!("  cuda: skipped ({e})"),
    }
    #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
    println!("(built without GPU backends: add --features wgpu or --features cuda to compare)");
    let _ = cpu;
}
