//! Training-step benchmark of the ControlNet families at real size, random weights, f32:
//! `cargo bench -p lisa-trainer --bench sd_step` measures SD 1.5 (UNet 0.86 B parameters,
//! ControlNet 0.36 B, 64×64 latents, 77 text tokens of 768); `LISA_BENCH_MODEL=sdxl` SDXL
//! (UNet 2.6 B, ControlNet 1.25 B, 128×128 latents, 77 tokens of 2048, pooled text and time
//! ids); `LISA_BENCH_MODEL=flux` FLUX.1-dev (transformer 11.9 B, a ControlNet of 4 + 4 blocks
//! made from it, 2.05 B, 512 px: 64×64 latents, 512 T5 tokens of 4096, pooled CLIP text,
//! guidance 3.5); `LISA_BENCH_MODEL=sd3` SD3-medium (transformer 2.08 B, a ControlNet of 12
//! blocks made from it, 1.12 B, as train_controlnet_sd3.py; 512 px: 64×64 latents, 77 CLIP +
//! 77 T5 tokens of 4096, pooled text of 2048). A model the CPU's memory cannot hold is said
//! and skipped.
//! `LISA_BENCH_STEPS=N`, default 2 per arm; `LISA_BENCH_BATCH=N`, default 1;
//! `LISA_BENCH_BACKEND=cpu|wgpu|cuda`, default cpu, the GPU ones with the trainer's feature of
//! that name, where each arm also prints the device memory cubecl's pools reserved, the
//! largest after any step.
//! Without `--bench` (under `cargo test --all-targets`) it runs one step of each arm on the
//! tiny golden-file configurations (SD 1.5-like, SDXL-like, Flux-like and SD3-like) instead.
//!
//! A step is what training does: the frozen main network's encoding under no-grad, the
//! ControlNet, the main network with residuals, the losses, the backward into the ControlNet
//! (and the LISA decoder), and AdamW on every trainable tensor. LISA adds the prior pass (the
//! main network again, without residuals, no grad) and the decoder hooked at `down_5` (as the
//! LISA authors do) or, for Flux and SD3, `block_0`. Prints the step times, their ratio and the peak
//! resident memory.
//! `LISA_BENCH_ARMS=lisa-ckpt` runs the LISA step with gradient checkpointing (one arm per
//! process gives each arm's own peak memory). `LISA_BENCH_PRECISION=bf16|fp16` trains under
//! autocast as `--mixed-precision` does (the frozen network stored in the half type; the loss
//! scale of fp16 is left out: it costs one multiply per gradient).
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

/// The model a bench run measures: its architecture and `[model]` keys, latent side, text
/// tokens, token width and pooled width (SDXL, Flux, SD3).
struct BenchModel {
    name: &'static str,
    architecture: &'static str,
    config: serde_json::Map<String, serde_json::Value>,
    side: usize,
    tokens: usize,
    width: usize,
    pooled: Option<usize>,
}

impl BenchModel {
    /// `LISA_BENCH_MODEL`'s model (`sd15`, the default, `sdxl`, `flux` or `sd3`) at its real size, or
    /// the tiny golden-file configuration of that family.
    fn new(family: &str, full: bool) -> Self {
        let fixture = |path: &str| -> serde_json::Value {
            let path = format!("{}/tests/fixtures/{path}/config.json", env!("CARGO_MANIFEST_DIR"));
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        let unet = |unet: serde_json::Value| json!({ "unet": unet });
        // A ControlNet made from the transformer (train_controlnet_flux.py's 4 + 4 blocks at
        // real size), `side` latents.
        let flux = |transformer: serde_json::Value, layers: usize, side: usize| {
            json!({
                "transformer": transformer, "controlnet_layers": layers, "controlnet_single_layers": layers,
                "latent_size": side
            })
        };
        // A ControlNet of `layers` blocks made from the SD3 transformer, `side` latents.
        let sd3 = |transformer: serde_json::Value, layers: usize, side: usize| json!({ "transformer": transformer, "controlnet_layers": layers, "latent_size": side });
        let (name, architecture, config, side, tokens, width, pooled) = match (family, full) {
            ("sd15", true) => (
                "SD 1.5 size",
                "sd",
                unet(json!({
                    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
                    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
                    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5,
                    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
                })),
                64,
                77,
                768,
                None,
            ),
            // stable-diffusion-xl-base-1.0's unet/config.json (the keys lisa reads), 1024 px.
            ("sdxl", true) => (
                "SDXL size",
                "sd",
                unet(json!({
                    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
                    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
                    "cross_attention_dim": 2048, "norm_num_groups": 32, "norm_eps": 1e-5,
                    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
                    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                    "projection_class_embeddings_input_dim": 2816,
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
                })),
                128,
                77,
                2048,
                Some(1280),
            ),
            // FLUX.1-dev's transformer/config.json, 512 px, FluxPipeline's 512 T5 tokens.
            ("flux", true) => (
                "FLUX.1-dev size",
                "flux",
                flux(
                    json!({
                        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64,
                        "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                        "guidance_embeds": true, "axes_dims_rope": [16, 56, 56]
                    }),
                    4,
                    64,
                ),
                64,
                512,
                4096,
                Some(768),
            ),
            // stable-diffusion-3-medium-diffusers' transformer/config.json; train_controlnet_sd3.py's
            // 512 px, 12 ControlNet blocks and 77 T5 tokens after CLIP's 77.
            ("sd3", true) => (
                "SD3-medium size",
                "sd3",
                sd3(
                    json!({
                        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2,
                        "in_channels": 16, "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                        "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                        "out_channels": 16, "pos_embed_max_size": 192
                    }),
                    12,
                    64,
                ),
                64,
                154,
                4096,
                Some(2048),
            ),
            ("sd15", false) => ("tiny SD 1.5-like", "sd", unet(fixture("sd/sd15/unet")), 8, 5, 12, None),
            ("sdxl", false) => ("tiny SDXL-like", "sd", unet(fixture("sd/sdxl/unet")), 8, 5, 12, Some(10)),
            ("flux", false) => {
                ("tiny Flux-like", "flux", flux(fixture("flux/dev/transformer"), 1, 8), 8, 5, 12, Some(10))
            }
            ("sd3", false) => ("tiny SD3-like", "sd3", sd3(fixture("sd3/sd3/transformer"), 2, 8), 8, 5, 12, Some(10)),
            (other, _) => panic!("LISA_BENCH_MODEL: unknown model {other:?} (sd15, sdxl, flux, sd3)"),
        };
        let serde_json::Value::Object(config) = config else { unreachable!("the configs above are objects") };
        BenchModel { name, architecture, config, side, tokens, width, pooled }
    }

    /// The LISA decoder's hook: `down_5` on a UNet's ControlNet, the first block on a flow
    /// transformer's (Flux, SD3).
    fn hook(&self) -> &'static str {
        if self.architecture == "sd" { "down_5" } else { "block_0" }
    }

    /// The spec this bench trains (`precision`: the `mixed_precision` key).
    fn spec(&self, precision: &str) -> ModelSpec {
        let mut config = self.config.clone();
        config.insert("mixed_precision".into(), json!(precision));
        let decoder = DecoderConfig {
            hook: Some(self.hook().parse().unwrap()),
            time_sinusoidal_dim: 256,
            channel_floor: 64,
            ..DecoderConfig::default()
        };
        ModelSpec { architecture: self.architecture.into(), decoder, config }
    }

    /// At least how many bytes training `spec` with batches of `batch` takes, and the
    /// parameter counts (main, ControlNet) behind it.
    fn training_bytes(&self, spec: &ModelSpec, batch: usize) -> (u128, u128, u128) {
        use lisa_trainer::model::{flux, sd, sd3};
        match self.architecture {
            "flux" => {
                let f = flux::FluxSpec::from_spec(spec).unwrap();
                let (main, side) = f.parameter_counts().unwrap();
                (f.training_bytes(batch, self.tokens, false).unwrap(), main, side)
            }
            "sd3" => {
                let s = sd3::Sd3Spec::from_spec(spec).unwrap();
                let (main, side) = s.parameter_counts().unwrap();
                (s.training_bytes(batch, self.tokens, false).unwrap(), main, side)
            }
            _ => {
                let sd = sd::SdSpec::from_spec(spec).unwrap();
                let params = sd.parameter_estimate().unwrap();
                (sd.training_bytes(batch, false).unwrap(), params.unet, params.controlnet)
            }
        }
    }

    /// `n` random prompts (seed `seed`), with pooled text for SDXL, Flux and SD3.
    fn prompts<B: Backend>(&self, n: usize, seed: u64, device: &B::Device) -> PromptEmbedding {
        let random = |len: usize, seed: u64| -> Vec<f32> {
            B::to_vec(&B::random_normal(&Shape::new([len]), seed, DType::F32, device).unwrap()).unwrap()
        };
        let (tokens, dim) = (self.tokens, self.width);
        let values = random(n * tokens * dim, seed);
        match self.pooled {
            None => PromptEmbedding::Text { values, tokens, dim },
            Some(pooled_dim) => PromptEmbedding::TextPooled {
                values,
                tokens,
                dim,
                pooled: random(n * pooled_dim, seed + 1),
                pooled_dim,
            },
        }
    }
}

/// This machine's memory in bytes (None: unknown).
fn machine_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u128 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn main() {
    lisa_cpu::keep_freed_memory(); // as the `lisa` command does
    let backend = std::env::var("LISA_BENCH_BACKEND").unwrap_or_else(|_| "cpu".into());
    match backend.as_str() {
        "cpu" => {
            let label = format!("CPU backend, {} threads", rayon::current_num_threads());
            run::<C>(CpuDevice, &label, &|| None)
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => match lisa_cubecl::WgpuBackend::probe() {
            Ok(d) => {
                let probe = d.clone();
                run::<lisa_cubecl::WgpuBackend>(d, "wgpu backend", &move || probe.memory_reserved())
            }
            Err(e) => {
                eprintln!("LISA_BENCH_BACKEND=wgpu: {e}");
                std::process::exit(2);
            }
        },
        #[cfg(feature = "cuda")]
        "cuda" => match lisa_cubecl::CudaBackend::probe() {
            Ok(d) => {
                let probe = d.clone();
                run::<lisa_cubecl::CudaBackend>(d, "CUDA backend (exact f32 matmul)", &move || probe.memory_reserved())
            }
            Err(e) => {
                eprintln!("LISA_BENCH_BACKEND=cuda: {e}");
                std::process::exit(2);
            }
        },
        other => {
            eprintln!(
                "LISA_BENCH_BACKEND={other}: not built in (cpu always; wgpu and cuda with the trainer's feature of that name)"
            );
            std::process::exit(2);
        }
    }
}

/// The arms on backend `B`; `device_memory` reads the device's reserved memory (None on the CPU).
fn run<B: Backend>(device: B::Device, label: &str, device_memory: &dyn Fn() -> Option<u64>) {
    let full = std::env::args().any(|a| a == "--bench");
    match std::env::var("LISA_BENCH_MODEL") {
        Ok(family) => run_model::<B>(&BenchModel::new(&family, full), &device, label, device_memory),
        // `cargo test` smoke-runs every family's tiny configuration; the bench measures SD 1.5.
        Err(_) if !full => {
            for family in ["sd15", "sdxl", "flux", "sd3"] {
                run_model::<B>(&BenchModel::new(family, full), &device, label, device_memory);
            }
        }
        Err(_) => run_model::<B>(&BenchModel::new("sd15", full), &device, label, device_memory),
    }
}

/// The arms for one model.
fn run_model<B: Backend>(bench: &BenchModel, device: &B::Device, label: &str, device_memory: &dyn Fn() -> Option<u64>) {
    let full = std::env::args().any(|a| a == "--bench");
    let device = device.clone();
    let batch: usize = std::env::var("LISA_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    let steps: usize = std::env::var("LISA_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let steps = if full { steps.max(1) } else { 1 };
    let (side, tokens) = (bench.side, bench.tokens);
    let precision = std::env::var("LISA_BENCH_PRECISION").unwrap_or_else(|_| "no".into());
    assert!(["no", "bf16", "fp16"].contains(&precision.as_str()), "LISA_BENCH_PRECISION: no | bf16 | fp16");
    let spec = bench.spec(&precision);
    println!(
        "sd_step: {} ({}x{} latents, {tokens} tokens of {}, batch {batch}, {}), {steps} step(s) per arm, {label}",
        bench.name,
        side,
        side,
        bench.width,
        match precision.as_str() {
            "no" => "f32".to_string(),
            half => {
                let dtype = if half == "bf16" { DType::BF16 } else { DType::F16 };
                format!("autocast {half}, half products: {:?}", B::half_products(&device, dtype))
            }
        },
    );
    // The CPU backend's memory is this machine's: a model that cannot fit is said, not run.
    let (needed, main_params, side_params) = bench.training_bytes(&spec, batch);
    if label.starts_with("CPU")
        && let Some(total) = machine_memory()
        && needed > total
    {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        println!(
            "  not run: training needs at least {:.1} GiB (weights, the ControlNet's gradients and AdamW moments, activations; about {:.2} B main and {:.2} B ControlNet parameters); this machine has {:.1} GiB",
            gib(needed),
            main_params as f64 / 1e9,
            side_params as f64 / 1e9,
            gib(total)
        );
        return;
    }
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
            "sample" => (false, false, "sample".to_string()),
            other => panic!("LISA_BENCH_ARMS: unknown arm {other:?} (baseline, lisa, lisa-ckpt, sample)"),
        })
        .collect();
    for (lisa, ckpt, label) in &arms {
        if label == "sample" {
            sample_arm::<B>(&spec, &device, bench, full, device_memory);
            continue;
        }
        let (lisa, ckpt) = (*lisa, *ckpt);
        let mut model = registry::build::<B>(&spec, Parts::Dual { decoder: lisa }, device.clone(), 0).unwrap();
        let count = |prefix: &str| -> usize {
            model
                .store()
                .iter()
                .filter(|(_, p)| p.name.starts_with(prefix))
                .map(|(_, p)| B::shape(&p.value).num_elements().unwrap())
                .sum()
        };
        if !lisa {
            println!(
                "  parameters: main {:.3} B, ControlNet {:.3} B",
                count("main.") as f64 / 1e9,
                count("side.") as f64 / 1e9
            );
        }
        // AdamW state for every trainable tensor.
        let trainable: Vec<_> = model.store().iter().filter(|(_, p)| p.trainable).map(|(id, _)| id).collect();
        let mut moments: Vec<(B::Tensor, B::Tensor)> = trainable
            .iter()
            .map(|&id| {
                let v = &model.store().get(id).value;
                (B::zeros_like(v).unwrap(), B::zeros_like(v).unwrap())
            })
            .collect();
        let mut times = Vec::new();
        let mut device_peak = 0u64;
        for s in 0..steps {
            let start = Instant::now();
            let (latents, hint) = bench_inputs(model.as_ref(), batch);
            let x = B::random_normal(&latents, 10 + s as u64, DType::F32, &device).unwrap();
            let noise = B::random_normal(&latents, 20 + s as u64, DType::F32, &device).unwrap();
            let hint = B::full(&hint, 0.5, DType::F32, &device).unwrap();
            let cond = Conditioning { t: vec![500.0; batch], prompt: bench.prompts::<B>(batch, 30, &device) };
            let grads = {
                let tape = Tape::<B>::new();
                let bound = model.store().bind(&tape);
                let (xv, hv) = (tape.constant(x.clone()), tape.constant(hint.clone()));
                let side = if ckpt { SideMode::Checkpointed } else { SideMode::Recorded };
                let options = ForwardOptions { side, ..ForwardOptions::lisa(lisa) };
                let mut out = forward_train(model.as_ref(), &bound, &xv, &hv, &cond, options).unwrap();
                let side_leaves = out.side_leaves.take();
                let (_, g_pred) = B::mse_loss(&out.pred.value, &noise).unwrap();
                let mut roots = vec![(&out.pred, g_pred)];
                if let (Some(dec), Some(prior)) = (&out.decoded, &out.prior) {
                    let target = B::sub(&noise, prior).unwrap();
                    let (_, g_dec) = B::mse_loss(&dec.value, &target).unwrap();
                    roots.push((dec, B::scale(&g_dec, 0.2).unwrap()));
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
                B::adamw_update(&mut model.store_mut().get_mut(id).value, m, v, &g, &hp).unwrap();
            }
            // One value read back: the device has finished the step (a no-op wait on the CPU).
            if let Some(&id) = trainable.first() {
                B::to_vec(&B::sum(&model.store().get(id).value).unwrap()).unwrap();
            }
            times.push(start.elapsed().as_secs_f64());
            device_peak = device_peak.max(device_memory().unwrap_or(0));
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let device_mem = match device_memory() {
            Some(_) => format!(", device memory reserved {:.2} GiB", device_peak as f64 / (1u64 << 30) as f64),
            None => String::new(),
        };
        println!(
            "  {:<8} step {:>8.2} s (median of {steps}; in order: {:?}), peak RSS {:.2} GiB{device_mem}",
            label,
            median,
            times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>(),
            rss_kib("VmHWM:") as f64 / (1 << 20) as f64
        );
        results.push(median);
    }
    if results.len() >= 2 && arms[1].2 != "sample" {
        println!("  {} / {} step time: {:.3}", arms[1].2, arms[0].2, results[1] / results[0]);
    }
}

/// Sampling with the ControlNet, no classifier-free guidance, as diffusers' pipeline does it
/// (DDIM for SD, Euler for Flux and SD3)
/// (`LISA_BENCH_SAMPLE_STEPS`, default 20; `LISA_BENCH_SAMPLE_IMAGES`, default 4; the tiny
/// configuration samples 2 steps of 1 image): one timed run, with the peak memory.
fn sample_arm<B: Backend>(
    spec: &ModelSpec,
    device: &B::Device,
    bench: &BenchModel,
    full: bool,
    device_memory: &dyn Fn() -> Option<u64>,
) {
    use lisa_trainer::sample::{SampleConfig, Sampler, sample_embedded};
    use lisa_trainer::scheduler::NoiseConfig;
    let var = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d).max(1);
    let (steps, n) =
        if full { (var("LISA_BENCH_SAMPLE_STEPS", 20), var("LISA_BENCH_SAMPLE_IMAGES", 4)) } else { (2, 1) };
    let model = registry::build::<B>(spec, Parts::Dual { decoder: false }, device.clone(), 0).unwrap();
    // DDIM on SD's schedule; Euler on Flux's (FluxPipeline's dynamic shift at 512 px: 1024
    // image tokens, μ ≈ 0.63, e^μ ≈ 1.88; the step's cost does not depend on it).
    let (noise, sampler) = match bench.architecture {
        "flux" => (
            NoiseConfig::Flow {
                shift: Some(1.0),
                weighting: Default::default(),
                num_train_timesteps: Some(1000),
                precondition_outputs: false,
                sampling_shift: Some(1.88),
            },
            Sampler::Euler,
        ),
        // SD3's FlowMatchEulerDiscreteScheduler: shift 3, no dynamic shifting.
        "sd3" => (
            NoiseConfig::Flow {
                shift: Some(3.0),
                weighting: Default::default(),
                num_train_timesteps: Some(1000),
                precondition_outputs: false,
                sampling_shift: None,
            },
            Sampler::Euler,
        ),
        _ => (
            NoiseConfig::Diffusion {
                betas: lisa_core::schedule::BetaSchedule::SD_SCALED_LINEAR,
                num_train_timesteps: 1000,
            },
            Sampler::Ddim { eta: 0.0 },
        ),
    };
    let hint = B::full(&bench_inputs(model.as_ref(), n).1, 0.5, DType::F32, device).unwrap();
    let prompt = bench.prompts::<B>(n, 30, device);
    let cfg = SampleConfig { sampler, steps, clip_sample: false, ..SampleConfig::default() };
    let start = Instant::now();
    let x = sample_embedded(model.as_ref(), &noise, &hint, &prompt, &prompt, &cfg).unwrap();
    B::to_vec(&B::sum(&x).unwrap()).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let device_mem = match device_memory() {
        Some(m) => format!(", device memory reserved {:.2} GiB", m as f64 / (1u64 << 30) as f64),
        None => String::new(),
    };
    println!(
        "  sample   {}-{steps} of {n} image(s) {seconds:>8.2} s ({:.3} s per step), peak RSS {:.2} GiB{device_mem}",
        if bench.architecture == "sd" { "DDIM" } else { "Euler" },
        seconds / steps as f64,
        rss_kib("VmHWM:") as f64 / (1 << 20) as f64
    );
}

/// The shapes of a batch of `n`: the latents, and the condition the ControlNet reads (pixels
/// at 8× the latent side for SD, VAE latents of the sample's shape for Flux and SD3).
fn bench_inputs<B: Backend>(model: &dyn lisa_trainer::model::DualDenoiser<B>, n: usize) -> (Shape, Shape) {
    let [c, h, w] = model.sample_shape();
    let hint = if model.latent_hints() { [n, model.hint_channels(), h, w] } else { [n, 3, 8 * h, 8 * w] };
    (Shape::new([n, c, h, w]), Shape::new(hint))
}
