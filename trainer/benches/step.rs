//! Training-step benchmark of the reference toy configuration on the CPU backend:
//! `cargo bench -p lisa-trainer --bench step` (`LISA_BENCH_STEPS=N` to change the count).
//! Without `--bench` (under `cargo test --all-targets`) it runs a 2-step smoke version.
//!
//! Prints the median step time of the baseline and of LISA, their ratio, the time of the
//! prior pass (main up path, no grad) and of the LISA decoder measured on their own, and the
//! resident memory after warm-up and at the end (peak and current) to show it stays flat.
#![allow(missing_docs)]

use std::time::Instant;

use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Conditioning, ModelSpec, Parts, PromptEmbedding, registry};
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(mode: Mode, subbatch: Option<usize>, steps: usize, data: &FillCircles) -> (f64, u64, u64) {
    let model =
        registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: mode == Mode::Lisa }, CpuDevice, 0).unwrap();
    let mut t = Trainer::new(
        model,
        TrainConfig { mode, lisa_subbatch: subbatch, max_train_steps: steps as u64, ..TrainConfig::default() },
    )
    .unwrap();
    let warm = 3.min(steps.saturating_sub(1)); // at least one timed step
    for _ in 0..warm {
        t.step(data).unwrap();
    }
    let rss_after_warmup = rss_kib("VmRSS:");
    let times: Vec<f64> = (warm..steps)
        .map(|_| {
            let s = Instant::now();
            t.step(data).unwrap();
            s.elapsed().as_secs_f64()
        })
        .collect();
    (median(times), rss_after_warmup, rss_kib("VmRSS:"))
}

/// `LISA_BENCH_MEMORY_STEPS=N`: one LISA run of N steps, printing the resident memory every
/// N/10 steps (flat memory = no leak across steps).
fn memory_run(steps: usize, data: &FillCircles) {
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    let mut t = Trainer::new(model, TrainConfig { max_train_steps: steps as u64, ..TrainConfig::default() }).unwrap();
    println!("| step | RSS | peak RSS |\n|---|---|---|");
    for i in 1..=steps {
        t.step(data).unwrap();
        if i % (steps / 10).max(1) == 0 || i == 1 {
            println!("| {i} | {} MiB | {} MiB |", rss_kib("VmRSS:") / 1024, rss_kib("VmHWM:") / 1024);
        }
    }
}

fn main() {
    if let Some(n) = std::env::var("LISA_BENCH_MEMORY_STEPS").ok().and_then(|s| s.parse().ok()) {
        memory_run(n, &FillCircles { resolution: 32, len: 4096, seed: 0 });
        return;
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let default_steps = if smoke { 2 } else { 23 };
    let steps: usize =
        std::env::var("LISA_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_steps).max(1);
    let repeats = if smoke { 1 } else { 7 };
    let data = FillCircles { resolution: 32, len: 4096, seed: 0 };
    println!(
        "reference toy configuration, batch 32, 32×32, CPU backend, {} threads, {steps} steps per arm\n",
        rayon::current_num_threads()
    );
    let (base, base_rss0, base_rss1) = run(Mode::Baseline, None, steps, &data);
    let (lisa, lisa_rss0, lisa_rss1) = run(Mode::Lisa, None, steps, &data);
    let (half, half_rss0, half_rss1) = run(Mode::Lisa, Some(16), steps, &data);

    // The prior pass and the decoder on their own (forward; the decoder also backward).
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    let x = C::random_normal(
        &lisa_core::backend::Shape::new([32, 3, 32, 32]),
        1,
        lisa_core::backend::DType::F32,
        &CpuDevice,
    )
    .unwrap();
    let cond = Conditioning {
        t: (0..32).map(|i| (i * 31 % 1000) as f32).collect(),
        prompt: PromptEmbedding::Classes(vec![
            (0..32).map(|i| i % 8).collect(),
            (0..32).map(|i| (i + 1) % 8).collect(),
        ]),
    };
    let tape = Tape::<C>::new();
    let b = model.store().bind(&tape);
    let enc = tape.no_grad(|| model.encode_main(&b, &tape.constant(x.clone()), &cond).unwrap());
    let prior = median(
        (0..repeats)
            .map(|_| {
                let s = Instant::now();
                tape.no_grad(|| model.decode_main(&b, &enc, None).unwrap());
                s.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let h = C::random_normal(
        &lisa_core::backend::Shape::new([32, 64, 16, 16]),
        2,
        lisa_core::backend::DType::F32,
        &CpuDevice,
    )
    .unwrap();
    let dec = median(
        (0..repeats)
            .map(|_| {
                let tape = Tape::<C>::new();
                let b = model.store().bind(&tape);
                let s = Instant::now();
                let hv = tape.leaf(h.clone());
                let out = model.decode_lisa(&b, &hv, &cond.t).unwrap();
                let g = C::full(&C::shape(&out.value), 1e-3, lisa_core::backend::DType::F32, &CpuDevice).unwrap();
                tape.backward(&[(&out, g)]).unwrap();
                s.elapsed().as_secs_f64()
            })
            .collect(),
    );

    println!("| arm | median step | RSS after warm-up | RSS at end |");
    println!("|---|---|---|---|");
    println!("| baseline | {:.3} s | {} MiB | {} MiB |", base, base_rss0 / 1024, base_rss1 / 1024);
    println!("| LISA | {:.3} s | {} MiB | {} MiB |", lisa, lisa_rss0 / 1024, lisa_rss1 / 1024);
    println!("| LISA, sub-batch 16 | {:.3} s | {} MiB | {} MiB |", half, half_rss0 / 1024, half_rss1 / 1024);
    println!("\nLISA / baseline = {:.3}; LISA sub-batch 16 / baseline = {:.3}", lisa / base, half / base);
    println!(
        "prior pass (main up path, no grad): {:.1} ms = {:.0}% of the LISA step",
        prior * 1e3,
        100.0 * prior / lisa
    );
    println!("LISA decoder (forward + backward): {:.1} ms = {:.0}% of the LISA step", dec * 1e3, 100.0 * dec / lisa);
    println!("peak RSS of the process: {} MiB", rss_kib("VmHWM:") / 1024);
}
