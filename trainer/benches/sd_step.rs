//! Training-step benchmark of the sd architecture at the real SD 1.5 size (UNet 0.86 B
//! parameters, ControlNet 0.36 B, 64×64 latents, 77 text tokens of 768, batch 1), random
//! weights, f32, on the CPU backend:
//! `cargo bench -p lisa-trainer --bench sd_step` (`LISA_BENCH_STEPS=N`, default 2 per arm).
//! Without `--bench` (under `cargo test --all-targets`) it runs one step of each arm on the
//! tiny golden-file configuration instead.
//!
//! A step is what training does: the frozen UNet encoder under no-grad, the ControlNet, the
//! UNet decoder with residuals, the losses, the backward into the ControlNet (and the LISA
//! decoder), and AdamW on every trainable tensor. LISA adds the prior pass (the UNet decoder
//! again, without residuals, no grad) and the decoder hooked at `down_5` (as the LISA
//! authors do). Prints the step times, their ratio and the peak resident memory.
//! `LISA_BENCH_ARMS=lisa-ckpt` runs the LISA step with gradient checkpointing (one arm per
//! process gives each arm's own peak memory).
#![allow(missing_docs)]

use std::time::Instant;

use lisa_core::backend::prelude::*;
use lisa_core::backend::{AdamWParams, DType, Shape};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::{
    Conditioning, DecoderConfig, ForwardOptions, ModelSpec, Parts, PromptEmbedding, SideMode, forward_train, registry,
    replay_side,
};
use serde_json::json;

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

/// `(UNet config.json, latent side, tokens)`: SD 1.5's, or the tiny fixture's.
fn config(full: bool) -> (serde_json::Value, usize, usize) {
    if full {
        let unet = json!({
            "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
            "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
        });
        (unet, 64, 77)
    } else {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd/sd15/unet/config.json");
        (serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap(), 8, 5)
    }
}

fn main() {
    lisa_cpu::keep_freed_memory(); // as the `lisa` command does
    let full = std::env::args().any(|a| a == "--bench");
    let steps: usize = std::env::var("LISA_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let steps = if full { steps.max(1) } else { 1 };
    let (unet, side, tokens) = config(full);
    let mut spec_config = serde_json::Map::new();
    spec_config.insert("unet".into(), unet);
    let decoder = DecoderConfig {
        hook: Some("down_5".parse().unwrap()),
        time_sinusoidal_dim: 256,
        channel_floor: 64,
        ..DecoderConfig::default()
    };
    let spec = ModelSpec { architecture: "sd".into(), decoder, config: spec_config };
    println!(
        "sd_step: {} ({}x{} latents, {tokens} tokens, batch 1, f32), {steps} step(s) per arm, CPU backend, {} threads",
        if full { "SD 1.5 size" } else { "tiny smoke config" },
        side,
        side,
        rayon::current_num_threads()
    );
    let mut results = Vec::new();
    // `LISA_BENCH_ARMS`: a comma list of baseline, lisa, lisa-ckpt (gradient checkpointing);
    // run one arm per process to compare peak memory.
    let arms = std::env::var("LISA_BENCH_ARMS").unwrap_or_else(|_| "baseline,lisa".into());
    let arms: Vec<(bool, bool, String)> = arms
        .split(',')
        .map(|a| match a.trim() {
            "baseline" => (false, false, "baseline".to_string()),
            "lisa" => (true, false, "LISA".to_string()),
            "lisa-ckpt" => (true, true, "LISA+ckpt".to_string()),
            other => panic!("LISA_BENCH_ARMS: unknown arm {other:?} (baseline, lisa, lisa-ckpt)"),
        })
        .collect();
    for (lisa, ckpt, label) in &arms {
        let (lisa, ckpt) = (*lisa, *ckpt);
        let mut model = registry::build::<C>(&spec, Parts::Dual { decoder: lisa }, CpuDevice, 0).unwrap();
        let count = |prefix: &str| -> usize {
            model
                .store()
                .iter()
                .filter(|(_, p)| p.name.starts_with(prefix))
                .map(|(_, p)| C::shape(&p.value).num_elements().unwrap())
                .sum()
        };
        if !lisa {
            println!(
                "  parameters: UNet {:.3} B, ControlNet {:.3} B",
                count("main.") as f64 / 1e9,
                count("side.") as f64 / 1e9
            );
        }
        // AdamW state for every trainable tensor.
        let trainable: Vec<_> = model.store().iter().filter(|(_, p)| p.trainable).map(|(id, _)| id).collect();
        let mut moments: Vec<(lisa_cpu::CpuTensor, lisa_cpu::CpuTensor)> = trainable
            .iter()
            .map(|&id| {
                let v = &model.store().get(id).value;
                (C::zeros_like(v).unwrap(), C::zeros_like(v).unwrap())
            })
            .collect();
        let mut times = Vec::new();
        for s in 0..steps {
            let start = Instant::now();
            let x = C::random_normal(&Shape::new([1, 4, side, side]), 10 + s as u64, DType::F32, &CpuDevice).unwrap();
            let noise =
                C::random_normal(&Shape::new([1, 4, side, side]), 20 + s as u64, DType::F32, &CpuDevice).unwrap();
            let hint = C::full(&Shape::new([1, 3, 8 * side, 8 * side]), 0.5, DType::F32, &CpuDevice).unwrap();
            let ctx =
                C::random_normal(&Shape::new([1, tokens, if full { 768 } else { 12 }]), 30, DType::F32, &CpuDevice)
                    .unwrap();
            let dim = C::shape(&ctx).dims()[2];
            let cond = Conditioning {
                t: vec![500.0],
                prompt: PromptEmbedding::Text { values: C::to_vec(&ctx).unwrap(), tokens, dim },
            };
            let grads = {
                let tape = Tape::<C>::new();
                let bound = model.store().bind(&tape);
                let (xv, hv) = (tape.constant(x.clone()), tape.constant(hint.clone()));
                let side = if ckpt { SideMode::Checkpointed } else { SideMode::Recorded };
                let options = ForwardOptions { side, ..ForwardOptions::lisa(lisa) };
                let mut out = forward_train(model.as_ref(), &bound, &xv, &hv, &cond, options).unwrap();
                let side_leaves = out.side_leaves.take();
                let (_, g_pred) = C::mse_loss(&out.pred.value, &noise).unwrap();
                let mut roots = vec![(&out.pred, g_pred)];
                if let (Some(dec), Some(prior)) = (&out.decoded, &out.prior) {
                    let target = C::sub(&noise, prior).unwrap();
                    let (_, g_dec) = C::mse_loss(&dec.value, &target).unwrap();
                    roots.push((dec, C::scale(&g_dec, 0.2).unwrap()));
                }
                let leaves = bound.leaves();
                let mut g = tape.backward(&roots).unwrap();
                let mut grads: Vec<_> = leaves.into_iter().map(|(p, v)| (p, g.remove(v))).collect();
                if let Some(side_leaves) = side_leaves {
                    drop(roots);
                    drop(out);
                    let (leaves, mut g2) = replay_side(model.as_ref(), &side_leaves, &mut g, &x, &hint, &cond).unwrap();
                    grads.extend(leaves.into_iter().map(|(p, v)| (p, g2.remove(v))));
                }
                grads.retain(|(_, g)| g.is_some());
                grads
            };
            let hp =
                AdamWParams { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, step: s as u64 + 1 };
            for (i, &id) in trainable.iter().enumerate() {
                let Some(Some(g)) = grads.iter().find(|(p, _)| *p == id).map(|(_, g)| g.clone()) else { continue };
                let (m, v) = &mut moments[i];
                C::adamw_update(&mut model.store_mut().get_mut(id).value, m, v, &g, &hp).unwrap();
            }
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "  {:<8} step {:>8.2} s (median of {steps}; all: {:?}), peak RSS {:.2} GiB",
            label,
            median,
            times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>(),
            rss_kib("VmHWM:") as f64 / (1 << 20) as f64
        );
        results.push(median);
    }
    if results.len() >= 2 {
        println!("  {} / {} step time: {:.3}", arms[1].2, arms[0].2, results[1] / results[0]);
    }
}
