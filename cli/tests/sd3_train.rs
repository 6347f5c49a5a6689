//! `lisa train --pretrained-model-name-or-path` on an SD3 pipeline folder: a ControlNet with
//! LISA for the tiny golden-file SD3 transformer (flow matching with the folder's scheduler),
//! on a Fill50K folder with precomputed latents, condition latents and text embeddings;
//! checkpoints, an exact resume and the diffusers SD3 ControlNet folder at the end. Then a
//! whole tiny SD3 pipeline (transformer, the 16-channel VAE and the three text encoders of the
//! golden files) whose inputs lisa computes into its cache and reuses, and which validates
//! with a sampled, VAE-decoded grid; and the bad inputs of this path.

use std::path::{Path, PathBuf};

mod common;

use common::{fails_with, lisa, ok, s};
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::model::sd::write_diffusers_folder;
use lisa_trainer::model::sd3::{POSITIONS_BUFFER, Sd3Config, Sd3Transformer, sincos_positions};
use lisa_trainer::params::ParamStore;
use lisa_trainer::weights::to_safetensors;
use serde_json::json;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-sd3-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures/sd3")
}

const SCHEDULER: &str =
    r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// An SD3 pipeline folder with the golden files' tiny transformer (4 latent channels, text
/// 12 wide, pooled 10) and a flow-matching scheduler.
fn pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("pipeline");
    copy_dir(&fixtures().join("sd3/transformer"), &p.join("transformer"));
    std::fs::create_dir_all(p.join("scheduler")).unwrap();
    std::fs::write(p.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    std::fs::write(p.join("model_index.json"), r#"{"_class_name": "StableDiffusion3ControlNetPipeline"}"#).unwrap();
    p
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, u64)]) {
    let made: Vec<(String, lisa_cpu::CpuTensor)> = tensors
        .iter()
        .map(|(n, shape, seed)| {
            (n.clone(), C::random_normal(&Shape::new(shape.as_slice()), *seed, DType::F32, &CpuDevice).unwrap())
        })
        .collect();
    let refs: Vec<(String, &lisa_cpu::CpuTensor)> = made.iter().map(|(n, t)| (n.clone(), t)).collect();
    std::fs::write(path, to_safetensors::<C>(&refs, Default::default()).unwrap()).unwrap();
}

const PROMPTS: [&str; 3] = ["a red circle on a blue ground", "a green square", "a small yellow triangle"];

/// `prompt.json` of 3 examples with `side`-pixel ring images in source/ and target/.
fn listed(d: &Path, side: u32) {
    std::fs::create_dir_all(d.join("source")).unwrap();
    std::fs::create_dir_all(d.join("target")).unwrap();
    let mut lines = String::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let c = side as f32 / 2.0;
        let img = image::RgbImage::from_fn(side, side, |x, y| {
            let r = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            image::Rgb(if (r - 2.0 - i as f32).abs() < 1.0 { [255, 255, 255] } else { [0, 0, 0] })
        });
        img.save(d.join(format!("source/{i}.png"))).unwrap();
        img.save(d.join(format!("target/{i}.png"))).unwrap();
        lines +=
            &format!("{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"{prompt}\"}}\n");
    }
    std::fs::write(d.join("prompt.json"), lines).unwrap();
}

/// The Fill50K folder with the four precomputed files of an SD3 run: 8×8 latents and
/// condition latents of 4 channels, text tokens `[5, 12]`, pooled projections `[1, 10]`.
fn data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    listed(&d, 64);
    let named = |field: &str, shape: Vec<usize>, seed: u64| -> Vec<(String, Vec<usize>, u64)> {
        (0..3).map(|i| (format!("{field}/{i}.png"), shape.clone(), seed + i as u64)).collect()
    };
    write_tensors(&d.join("latents.safetensors"), &named("target", vec![4, 8, 8], 100));
    write_tensors(&d.join("condition_latents.safetensors"), &named("source", vec![4, 8, 8], 150));
    let by_prompt = |shape: Vec<usize>, seed: u64| -> Vec<(String, Vec<usize>, u64)> {
        let mut t: Vec<_> =
            PROMPTS.iter().enumerate().map(|(i, p)| (p.to_string(), shape.clone(), seed + i as u64)).collect();
        t.push((String::new(), shape, seed + 10));
        t
    };
    write_tensors(&d.join("prompt_embeds.safetensors"), &by_prompt(vec![5, 12], 200));
    write_tensors(&d.join("pooled_prompt_embeds.safetensors"), &by_prompt(vec![1, 10], 300));
    d
}

fn train(pipe: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let steps = if extra.contains(&"--max-train-steps") { &[][..] } else { &["--max-train-steps", "2"][..] };
    let mut args = vec![
        "train",
        "--pretrained-model-name-or-path",
        s(pipe),
        "--train-data-dir",
        s(data),
        "--train-batch-size",
        "2",
        "--learning-rate",
        "1e-4",
        "--checkpointing-steps",
        "1",
        "--output-dir",
        s(out),
    ];
    args.extend_from_slice(steps);
    args.extend_from_slice(extra);
    lisa(&args)
}

#[test]
fn trains_an_sd3_controlnet_with_lisa_and_resumes_exactly() {
    let dir = workdir("run");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    let layers = ["--controlnet-num-layers", "2", "--hook", "block_1"];
    let err = ok(&train(&pipe, &data, &out, &layers));
    assert!(err.contains("hook block_1") && err.contains("using the precomputed"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let (loss, lisa_loss) = (l["loss"].as_f64().unwrap(), l["lisa_loss"].as_f64().unwrap());
        assert!(loss.is_finite() && loss > 0.0 && lisa_loss.is_finite() && lisa_loss > 0.0, "{l}");
    }
    // The run records SD3's flow: shift 3 on diffusers' grid, logit-normal times, preconditioned.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-2/state.json")).unwrap()).unwrap();
    let noise = &state["config"]["noise"];
    assert_eq!(noise["kind"], "flow", "{state}");
    assert_eq!((noise["shift"].as_f64(), noise["num_train_timesteps"].as_u64()), (Some(3.0), Some(1000)));
    assert_eq!(
        (noise["weighting"]["scheme"].as_str(), noise["precondition_outputs"].as_bool()),
        (Some("logit_normal"), Some(true))
    );
    let native = out.join("controlnet");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(native.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["_class_name"].as_str(), config["num_layers"].as_u64()), (Some("SD3ControlNetModel"), Some(2)));
    let weights = std::fs::read(native.join("diffusion_pytorch_model.safetensors")).unwrap();
    // Continue from the saved ControlNet.
    ok(&train(
        &pipe,
        &data,
        &dir.join("more"),
        &["--controlnet-model-name-or-path", s(&native), "--max-train-steps", "1", "--hook", "block_1"],
    ));
    // Resume from step 1: the same step 2, bit for bit.
    let ckpt = out.join("checkpoint-1");
    let resume: Vec<&str> = layers.iter().copied().chain(["--resume-from-checkpoint", s(&ckpt)]).collect();
    ok(&train(&pipe, &data, &out, &resume));
    let again = std::fs::read(native.join("diffusion_pytorch_model.safetensors")).unwrap();
    assert!(weights == again, "the resumed run's ControlNet differs from the uninterrupted one");
}

#[test]
fn bad_sd3_runs_are_named_before_training() {
    let dir = workdir("bad");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    // diffusers' default of 12 ControlNet blocks does not fit a 3-block transformer.
    fails_with(&train(&pipe, &data, &out, &[]), "1..=2");
    fails_with(&train(&pipe, &data, &out, &["--controlnet-num-layers", "2", "--hook", "down_3"]), "block_0..block_1");
    fails_with(
        &train(&pipe, &data, &out, &["--controlnet-num-layers", "2", "--weighting-scheme", "beta"]),
        "--weighting-scheme",
    );
    // Memory for the weights, optimizer state and activations is counted before any is read.
    let long = ["--controlnet-num-layers", "2", "--max-sequence-length", "1000000000"];
    fails_with(&train(&pipe, &data, &out, &long), "needs at least");
    let image = data.join("source/0.png");
    let validate = ["--controlnet-num-layers", "2", "--validation-image", s(&image)];
    fails_with(&train(&pipe, &data, &out, &validate), "--validation-image needs --validation-prompt");
    let prompted = [&validate[..], &["--validation-prompt", "a green square"]].concat();
    fails_with(&train(&pipe, &data, &out, &prompted), "has no vae/ to encode the condition images");
    // Condition latents of the wrong channels are named with their line.
    let wrong = dir.join("wrong");
    copy_dir(&data, &wrong);
    copy_dir(&data.join("source"), &wrong.join("source"));
    let named: Vec<_> = (0..3).map(|i| (format!("source/{i}.png"), vec![5, 8, 8], 1)).collect();
    write_tensors(&wrong.join("condition_latents.safetensors"), &named);
    fails_with(&train(&pipe, &wrong, &out, &["--controlnet-num-layers", "2"]), "the model reads [4, 8, 8]");
    // Without the precomputed files, the folder must hold the encoders.
    std::fs::remove_file(wrong.join("condition_latents.safetensors")).unwrap();
    fails_with(&train(&pipe, &wrong, &out, &["--controlnet-num-layers", "2"]), "has no vae/");
    // A scheduler of another kind.
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    fails_with(&train(&pipe, &data, &out, &["--controlnet-num-layers", "2"]), "FlowMatchEulerDiscreteScheduler");
}

/// A whole tiny SD3 pipeline: a transformer written here to fit the golden files' 16-channel
/// VAE (2× downscale) and text encoders (48-wide T5, pooled 32), on 16-px images.
fn full_pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("full");
    let config = json!({
        "_class_name": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 2,
        "joint_attention_dim": 48, "caption_projection_dim": 8, "pooled_projection_dim": 32,
        "pos_embed_max_size": 6
    });
    let c = Sd3Config::from_transformer_json(config.as_object().unwrap()).unwrap();
    let mut store = ParamStore::<C>::new(CpuDevice, 7);
    Sd3Transformer::new(&mut store, "", &c).unwrap();
    let table = sincos_positions(8, 6, 4);
    let positions = C::from_slice(&table, &Shape::new([1, 36, 8]), DType::F32, &CpuDevice).unwrap();
    let mut weights: Vec<(String, &lisa_cpu::CpuTensor)> = vec![(POSITIONS_BUFFER.to_string(), &positions)];
    weights.extend(store.iter().map(|(_, p)| (p.name.clone(), &p.value)));
    write_diffusers_folder::<C>(&weights, &config, &p.join("transformer")).unwrap();
    std::fs::create_dir_all(p.join("scheduler")).unwrap();
    std::fs::write(p.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    copy_dir(&fixtures().join("vae/vae"), &p.join("vae"));
    for part in ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"] {
        copy_dir(&fixtures().join("text").join(part), &p.join(part));
    }
    p
}

#[test]
fn a_whole_sd3_pipeline_encodes_its_inputs_once_and_trains() {
    let dir = workdir("full");
    let pipe = full_pipeline(&dir);
    let data = dir.join("images");
    listed(&data, 16);
    let out = dir.join("out");
    let flags = ["--controlnet-num-layers", "1", "--max-sequence-length", "8", "--max-train-steps", "1"];
    let image = data.join("source/1.png");
    let validation =
        ["--validation-image", s(&image), "--validation-prompt", "a blue square", "--validation-steps", "1"];
    let err = ok(&train(&pipe, &data, &out, &[&flags[..], &validation].concat()));
    // The validation grid: the condition image and the decoded sample.
    assert!(out.join("validation-000001.png").is_file(), "{err}");
    assert!(err.contains("cached 3 latents and 3 condition latents (16×8×8)"), "{err}");
    let cache = out.join("cache");
    for f in ["latents", "condition_latents", "prompt_embeds", "pooled_prompt_embeds"] {
        assert!(cache.join(format!("{f}.safetensors")).is_file(), "{f}");
    }
    // 77 CLIP tokens and 8 T5 tokens of 48; pooled 12 + 20.
    let embeds = lisa_trainer::weights::read_metadata(&cache.join("prompt_embeds.safetensors")).unwrap();
    assert!(embeds.contains_key("lisa.cache_key"));
    let table = lisa_trainer::model::sd::PromptTable::read(&cache.join("prompt_embeds.safetensors"), 48).unwrap();
    assert_eq!(table.tokens, 85);
    // A second run reuses the cache (the validation prompt is part of its key).
    let cached = ["--cache-dir", s(&cache)];
    let again = ok(&train(&pipe, &data, &dir.join("again"), &[&flags[..], &validation, &cached].concat()));
    assert!(again.contains("using the cached latents and text embeddings"), "{again}");
}

/// The README's `lisa train` command for SD3, as written, on the tiny whole pipeline (folders,
/// step count and ControlNet blocks swapped for tiny ones, nothing else).
#[test]
fn the_readme_sd3_command_runs_as_written() {
    let words = common::readme_train_command("### SD3 and SD3.5");
    let dir = workdir("readme");
    let pipe = full_pipeline(&dir);
    let data = dir.join("images");
    listed(&data, 16);
    let out = dir.join("runs/sd3");
    let args: Vec<String> = words
        .iter()
        .map(|w| match w.as_str() {
            "SD3_PIPELINE" => s(&pipe).to_string(),
            "DATA" => s(&data).to_string(),
            "runs/sd3" => s(&out).to_string(),
            "10000" => "2".to_string(),
            "12" => "1".to_string(),
            other => other.to_string(),
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&lisa(&refs));
    assert!(out.join("controlnet/diffusion_pytorch_model.safetensors").is_file());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
}

#[test]
fn sd3_on_two_ranks_trains_as_one_rank_with_the_global_batch() {
    let dir = workdir("ranks");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let layers = ["--controlnet-num-layers", "2"];
    let alone = dir.join("alone");
    ok(&train(&pipe, &data, &alone, &layers));
    // Two ranks of batch 1 (rank 1 a copy of rank 0's model, with its pooled text tables).
    let ranks = dir.join("ranks");
    ok(&lisa(&[
        "train",
        "--pretrained-model-name-or-path",
        s(&pipe),
        "--train-data-dir",
        s(&data),
        "--train-batch-size",
        "1",
        "--gpus",
        "2",
        "--learning-rate",
        "1e-4",
        "--max-train-steps",
        "2",
        "--controlnet-num-layers",
        "2",
        "--output-dir",
        s(&ranks),
    ]));
    let losses = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (losses(&alone), losses(&ranks));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!(lisa_core::tolerance::DATA_PARALLEL_LOSS_F32.accepts(*y, *x), "{b:?} on two ranks vs {a:?} alone");
    }
}
