//! `lisa train --pretrained-model-name-or-path` on a Flux pipeline folder: a tiny whole
//! pipeline written here (a transformer with random weights as wide as the CLIP and T5
//! fixtures, FLUX.1-dev's scheduler, the SD VAE fixture), its inputs encoded once and cached,
//! a LISA run hooked at a single-stream block with validation grids that resumes exactly, the
//! ControlNet saved as a diffusers folder, and the bad inputs of this path.

use std::path::{Path, PathBuf};

mod common;

use common::{fails_with, lisa, ok, readme_train_command, s};
use lisa_core::backend::DType;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::model::flux::{FluxConfig, FluxTransformer};
use lisa_trainer::params::ParamStore;
use lisa_trainer::weights::to_safetensors;
use serde_json::json;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-flux-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap().path();
        if e.is_file() {
            std::fs::copy(&e, to.join(e.file_name().unwrap())).unwrap();
        }
    }
}

const PROMPTS: [&str; 3] = ["red circle with blue background", "a green ring", "yellow on black"];

/// A whole tiny Flux pipeline: a Flux-dev-like transformer (guidance embedding; 2 double and 2
/// single blocks) written here to read the T5 fixture's 48-wide tokens and the CLIP fixture's
/// 32-wide pooled text, and 2×2 patches of the SD VAE fixture's 4 latent channels.
fn pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("flux-pipeline");
    let config = json!({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "out_channels": null,
        "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 48, "pooled_projection_dim": 32, "guidance_embeds": true, "axes_dims_rope": [2, 2, 4]
    });
    let c = FluxConfig::from_transformer_json(config.as_object().unwrap()).unwrap();
    let mut store = ParamStore::<C>::new(CpuDevice, 21);
    FluxTransformer::new(&mut store, "", &c).unwrap();
    let store: &ParamStore<C> = &store;
    let tensors: Vec<(String, &lisa_cpu::CpuTensor)> = store.iter().map(|(_, q)| (q.name.clone(), &q.value)).collect();
    std::fs::create_dir_all(p.join("transformer")).unwrap();
    std::fs::write(
        p.join("transformer/diffusion_pytorch_model.safetensors"),
        to_safetensors::<C>(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    std::fs::write(p.join("transformer/config.json"), config.to_string()).unwrap();
    std::fs::create_dir_all(p.join("scheduler")).unwrap();
    let scheduler = json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
        "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
        "shift": 3.0, "use_dynamic_shifting": true});
    std::fs::write(p.join("scheduler/scheduler_config.json"), scheduler.to_string()).unwrap();
    std::fs::write(p.join("model_index.json"), r#"{"_class_name": "FluxPipeline"}"#).unwrap();
    let f = fixtures();
    copy_dir(&f.join("vae"), &p.join("vae"));
    std::fs::remove_file(p.join("vae/io.safetensors")).unwrap();
    copy_dir(&f.join("clip/text_encoder"), &p.join("text_encoder"));
    copy_dir(&f.join("clip/tokenizer"), &p.join("tokenizer"));
    copy_dir(&f.join("sd3/text/text_encoder_3"), &p.join("text_encoder_2"));
    copy_dir(&f.join("sd3/text/tokenizer_3"), &p.join("tokenizer_2"));
    p
}

/// A Fill50K-layout folder of 3 examples: 64-px ring images in source/ and target/.
fn data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(d.join("source")).unwrap();
    std::fs::create_dir_all(d.join("target")).unwrap();
    let mut lines = String::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let r = ((x as f32 - 32.0).powi(2) + (y as f32 - 32.0).powi(2)).sqrt();
            image::Rgb(if (r - 10.0 - 4.0 * i as f32).abs() < 1.5 { [255, 255, 255] } else { [0, 0, 0] })
        });
        img.save(d.join(format!("source/{i}.png"))).unwrap();
        img.save(d.join(format!("target/{i}.png"))).unwrap();
        lines +=
            &format!("{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"{prompt}\"}}\n");
    }
    std::fs::write(d.join("prompt.json"), lines).unwrap();
    d
}

fn train(pipe: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let steps = if extra.contains(&"--max-train-steps") { &[][..] } else { &["--max-train-steps", "2"][..] };
    let resolution = if extra.contains(&"--resolution") { &[][..] } else { &["--resolution", "64"][..] };
    let tokens = if extra.contains(&"--max-sequence-length") { &[][..] } else { &["--max-sequence-length", "8"][..] };
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
    args.extend_from_slice(resolution);
    args.extend_from_slice(tokens);
    args.extend_from_slice(extra);
    lisa(&args)
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn a_whole_flux_pipeline_encodes_its_inputs_once_trains_and_resumes_exactly() {
    let dir = workdir("run");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    let layers = ["--num-double-layers", "1", "--num-single-layers", "2", "--hook", "single_block_1"];
    let cond = data.join("source/0.png");
    let validation = ["--validation-image", s(&cond), "--validation-prompt", "a red circle", "--validation-steps", "2"];
    let err = ok(&train(&pipe, &data, &out, &[&layers[..], &validation[..]].concat()));
    assert!(err.contains("hook single_block_1") && err.contains("cached 3 latents and 3 condition latents"), "{err}");
    let grid = image::open(out.join("validation-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (5 * 66, 66), "a condition | 4 samples row of 64 px (4 seeds)");
    // The condition latents' images are outlines: the control metric is measured on them.
    let rows = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let step2: serde_json::Value = serde_json::from_str(rows.lines().nth(1).unwrap()).unwrap();
    assert!(step2["control_f1"].as_f64().is_some_and(|f| (0.0..=1.0).contains(&f)), "{step2}");
    let first = losses(&out);
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|l| l.is_finite() && *l > 0.0), "{first:?}");
    for f in [
        "cache/latents.safetensors",
        "cache/condition_latents.safetensors",
        "cache/prompt_embeds.safetensors",
        "cache/pooled_prompt_embeds.safetensors",
        "controlnet/config.json",
        "checkpoint-1/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f}:\n{err}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("controlnet/config.json")).unwrap()).unwrap();
    assert_eq!(config["_class_name"], "FluxControlNetModel");
    assert_eq!((config["num_layers"].clone(), config["num_single_layers"].clone()), (json!(1), json!(2)));
    // Resumed from step 1: the cache reused, step 2 as the uninterrupted run's.
    let weights = std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    let ckpt = out.join("checkpoint-1");
    let resume = [&layers[..], &validation[..], &["--resume-from-checkpoint", s(&ckpt)]].concat();
    let err = ok(&train(&pipe, &data, &out, &resume));
    assert!(err.contains("using the cached latents"), "{err}");
    assert!(weights == std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap());
    // Another guidance scale trains otherwise (the same seed, another first loss).
    let out_g = dir.join("out-guidance");
    ok(&train(&pipe, &data, &out_g, &[&layers[..], &["--guidance-scale", "1.0", "--max-train-steps", "1"]].concat()));
    assert!(losses(&out_g)[0] != first[0], "{:?} vs {first:?}", losses(&out_g));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flux_runs_are_named_before_training() {
    let dir = workdir("bad");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    fails_with(&train(&pipe, &data, &out, &["--resolution", "72"]), "--resolution: 72 px");
    fails_with(&train(&pipe, &data, &out, &[]), "it takes 1..=2 and 0..=2 (--num-double-layers");
    let layers = ["--num-double-layers", "2", "--num-single-layers", "2"];
    fails_with(
        &train(&pipe, &data, &out, &[&layers[..], &["--hook", "single_block_2"]].concat()),
        "single_block_0..single_block_1",
    );
    fails_with(&train(&pipe, &data, &out, &["--controlnet-num-layers", "2"]), "--num-double-layers");
    fails_with(&train(&pipe, &data, &out, &["--num-double-layers", "3"]), "made from a transformer of 2 and 2");
    let bad_png = dir.join("bad.png");
    std::fs::write(&bad_png, b"not a png").unwrap();
    fails_with(
        &train(
            &pipe,
            &data,
            &out,
            &[&layers[..], &["--validation-image", s(&bad_png), "--validation-prompt", "x"]].concat(),
        ),
        "bad.png",
    );
    fails_with(&train(&pipe, &data, &out, &["--crops-coords-top-left-h", "8"]), "--crops-coords-top-left-h is for");
    // Memory for the weights, optimizer state and activations is counted before any is read.
    let long = [&layers[..], &["--max-sequence-length", "1000000000"]].concat();
    fails_with(&train(&pipe, &data, &out, &long), "needs at least");
    std::fs::rename(pipe.join("text_encoder_2"), dir.join("t5")).unwrap();
    fails_with(&train(&pipe, &data, &out, &layers), "has no text_encoder_2/");
    assert!(!out.join("metrics.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's Flux command, as written, on the tiny pipeline (folders and the step count
/// swapped for tiny ones, the resolution and T5 length for the tiny model's).
#[test]
fn the_readme_flux_command_runs_as_written() {
    let words = readme_train_command("### Flux");
    let dir = workdir("readme");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("runs/flux");
    let args: Vec<String> = words
        .iter()
        .map(|w| match w.as_str() {
            "FLUX_PIPELINE" => s(&pipe).to_string(),
            "runs/flux" => s(&out).to_string(),
            "10000" => "2".to_string(),
            "512" => "64".to_string(),
            other => other.replacen("DATA", s(&data), 1),
        })
        .collect();
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.extend(["--max-sequence-length", "8"]);
    ok(&lisa(&refs));
    assert!(out.join("controlnet/diffusion_pytorch_model.safetensors").is_file());
    assert!(out.join("validation-000002.png").is_file());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A union ControlNet (`num_mode` 3) for the tiny pipeline's transformer, written as the
/// diffusers folder `dir` with seeded random weights (the zero blocks too, so that it acts).
fn union_controlnet(pipe: &Path, dir: &Path) -> PathBuf {
    use lisa_trainer::model::flux::{FluxControlNet, FluxControlNetExtras};
    let config = lisa_trainer::model::sd::read_json_config(&pipe.join("transformer")).unwrap();
    let c = FluxConfig::from_transformer_json(&config).unwrap().controlnet_from_transformer(1, 1).unwrap();
    let extras = FluxControlNetExtras { num_mode: Some(3) };
    let mut store = ParamStore::<C>::new(CpuDevice, 5);
    FluxControlNet::new(&mut store, "", &c, extras).unwrap();
    let ids: Vec<_> = store.iter().map(|(id, _)| id).collect();
    for (i, id) in ids.into_iter().enumerate() {
        let shape = C::shape(&store.get(id).value);
        let v = C::random_normal(&shape, 900 + i as u64, DType::F32, &CpuDevice).unwrap();
        store.get_mut(id).value = C::scale(&v, 0.1).unwrap();
    }
    let store: &ParamStore<C> = &store;
    let tensors: Vec<(String, &lisa_cpu::CpuTensor)> = store.iter().map(|(_, q)| (q.name.clone(), &q.value)).collect();
    lisa_trainer::model::sd::write_diffusers_folder::<C>(&tensors, &c.controlnet_json(extras), dir).unwrap();
    dir.to_path_buf()
}

#[test]
fn a_union_controlnet_trains_with_its_control_type() {
    let dir = workdir("union");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let union = union_controlnet(&pipe, &dir.join("union-controlnet"));
    let cn = ["--controlnet-model-name-or-path", s(&union), "--max-train-steps", "1"];
    let cache = dir.join("cache");
    let cached = ["--cache-dir", s(&cache)];
    let (out0, out2) = (dir.join("out-mode-0"), dir.join("out-mode-2"));
    ok(&train(&pipe, &data, &out0, &[&cn[..], &cached[..], &["--control-mode", "0"]].concat()));
    ok(&train(&pipe, &data, &out2, &[&cn[..], &cached[..], &["--control-mode", "2"]].concat()));
    // The control type's token enters the ControlNet: another type, another first loss.
    assert!(losses(&out0)[0] != losses(&out2)[0], "{:?} vs {:?}", losses(&out0), losses(&out2));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("controlnet/config.json")).unwrap()).unwrap();
    assert_eq!(saved["num_mode"], 3);
    fails_with(&train(&pipe, &data, &dir.join("bad"), &cn), "name the control_mode");
    fails_with(&train(&pipe, &data, &dir.join("bad"), &[&cn[..], &["--control-mode", "3"]].concat()), "num_mode 3");
    let _ = std::fs::remove_dir_all(&dir);
}
