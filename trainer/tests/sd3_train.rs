//! Training the `sd3` architecture as train_controlnet_sd3.py does (flow matching with shift 3
//! over diffusers' 1000 training times, logit-normal times, preconditioned outputs) with LISA,
//! on the tiny SD3 fixture: the loss is the σ²-weighted velocity MSE, training moves the
//! ControlNet and the decoder, a run resumes bit for bit from a checkpoint, and the trained
//! ControlNet is saved as a diffusers folder that loads back unchanged; bf16 and fp16 autocast
//! runs track the f32 run. The README's SD3 `[train.noise]` block is `NoiseConfig::sd3()`.

use std::path::{Path, PathBuf};

use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::CpuBackend as C;
use lisa_trainer::autodiff::Tape;
use lisa_trainer::checkpoint::{load_checkpoint, save_checkpoint};
use lisa_trainer::data::{Dataset, Example};
use lisa_trainer::model::sd::read_json_config;
use lisa_trainer::model::{DECODER, ForwardOptions, ModelSpec, OutputInit, Parts, SIDE, forward_train, registry};
use lisa_trainer::run::{RunStream, noise_batch_at};
use lisa_trainer::scheduler::{NoiseConfig, NoiseProcess};
use lisa_trainer::train::{StepStats, TrainConfig, Trainer};
use lisa_trainer::weights::to_safetensors;
use serde_json::json;

fn fixture(part: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3/sd3").join(part)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-sd3-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Four examples: 8×8 latents (4 channels) and 5-channel condition latents, two prompts.
struct Latents(Vec<Example>);

impl Latents {
    fn new() -> Self {
        let examples = (0..4)
            .map(|i| Example {
                image: (0..4 * 64).map(|k| ((k * 7 + i * 13) % 17) as f32 / 8.5 - 1.0).collect(),
                hint: (0..5 * 64).map(|k| ((k * 5 + i * 3) % 11) as f32 / 5.5 - 1.0).collect(),
                prompt: if i % 2 == 0 { "a ring".into() } else { String::new() },
            })
            .collect();
        Self(examples)
    }
}

impl Dataset for Latents {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize) -> lisa_trainer::Result<Example> {
        Ok(self.0[i].clone())
    }
}

/// The prompts' text tokens (`[5, 12]`) and pooled projections (`[1, 10]`), two files.
fn embeddings(dir: &Path) -> (PathBuf, PathBuf) {
    let write = |name: &str, dims: [usize; 2], seed: u64| {
        let path = dir.join(name);
        let made: Vec<(String, lisa_cpu::CpuTensor)> = ["a ring", ""]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let t = C::random_normal(&Shape::new(dims), seed + i as u64, DType::F32, &Default::default());
                (p.to_string(), t.unwrap())
            })
            .collect();
        let refs: Vec<(String, &lisa_cpu::CpuTensor)> = made.iter().map(|(n, t)| (n.clone(), t)).collect();
        std::fs::write(&path, to_safetensors::<C>(&refs, Default::default()).unwrap()).unwrap();
        path
    };
    (write("prompt_embeds.safetensors", [5, 12], 7), write("pooled_prompt_embeds.safetensors", [1, 10], 9))
}

fn spec(embeds: &(PathBuf, PathBuf)) -> ModelSpec {
    let mut config = serde_json::Map::new();
    config.insert("transformer".into(), read_json_config(&fixture("transformer")).unwrap().into());
    config.insert("controlnet".into(), read_json_config(&fixture("controlnet")).unwrap().into());
    config.insert("text_embeddings".into(), json!(embeds.0));
    config.insert("pooled_text_embeddings".into(), json!(embeds.1));
    let mut spec = ModelSpec { architecture: "sd3".into(), decoder: Default::default(), config };
    spec.decoder.hook = Some("block_1".parse().unwrap());
    // The decoder's output layer random, so that LISA's gradient reaches the ControlNet at once.
    spec.decoder.output_init = OutputInit::LecunNormal;
    spec
}

fn trainer(embeds: &(PathBuf, PathBuf)) -> Trainer<C> {
    let mut model = registry::build::<C>(&spec(embeds), Parts::Dual { decoder: true }, Default::default(), 3).unwrap();
    model.load_main(&fixture("transformer")).unwrap();
    model.load_side(&fixture("controlnet")).unwrap();
    let mut config = TrainConfig { batch_size: 2, max_train_steps: 8, seed: 11, ..TrainConfig::default() };
    config.noise = NoiseConfig::sd3();
    config.optim.lr = 1e-3;
    Trainer::new(model, config).unwrap()
}

fn weights(t: &Trainer<C>, prefix: &str) -> Vec<f32> {
    let store = t.model.store();
    store.iter().filter(|(_, p)| p.name.starts_with(prefix)).flat_map(|(_, p)| C::to_vec(&p.value).unwrap()).collect()
}

fn run(t: &mut Trainer<C>, data: &Latents, steps: usize) -> Vec<StepStats> {
    (0..steps).map(|_| t.step(data).unwrap()).collect()
}

#[test]
fn sd3_trains_with_lisa_and_resumes_exactly() {
    let dir = scratch("resume");
    let (embeds, data) = (embeddings(&dir), Latents::new());
    let mut straight = trainer(&embeds);
    let (side0, dec0) = (weights(&straight, SIDE), weights(&straight, DECODER));
    let all = run(&mut straight, &data, 6);
    for s in &all {
        assert!(s.loss.is_finite() && s.lisa_loss > 0.0, "{s:?}");
    }
    assert!(weights(&straight, SIDE) != side0 && weights(&straight, DECODER) != dec0, "training moved nothing");

    let mut first = trainer(&embeds);
    run(&mut first, &data, 3);
    let ckpt = dir.join("checkpoint-3");
    save_checkpoint(&mut first, &data, &ckpt).unwrap();
    let mut resumed = trainer(&embeds);
    load_checkpoint(&mut resumed, &data, &ckpt).unwrap();
    let rest = run(&mut resumed, &data, 3);
    assert_eq!(resumed.run.state, straight.run.state);
    assert!(weights(&resumed, SIDE) == weights(&straight, SIDE), "the resumed run's weights differ");
    for (a, b) in rest.iter().zip(&all[3..]) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    }

    // The trained ControlNet as a diffusers folder, loaded back unchanged.
    let out = dir.join("controlnet");
    assert!(straight.model.export_side(&out).unwrap());
    let mut again = trainer(&embeds);
    again.model.load_side(&out).unwrap();
    assert!(weights(&again, SIDE) == weights(&straight, SIDE));
    let config = read_json_config(&out).unwrap();
    assert_eq!(config["_class_name"], json!("SD3ControlNetModel"));
    assert_eq!(config["extra_conditioning_channels"], json!(1));
}

/// With preconditioned outputs the diffusion loss is `mean(σ²·(pred − v)²)`: diffusers'
/// `mse(x_t − σ·pred, x₀)`, computed here by hand from the same batch.
#[test]
fn the_preconditioned_flow_loss_is_diffusers() {
    let dir = scratch("loss");
    let (embeds, data) = (embeddings(&dir), Latents::new());
    let t = trainer(&embeds);
    let model = t.model.as_ref();
    let noise = NoiseProcess::new(&NoiseConfig::sd3()).unwrap();
    let mut stream = RunStream::new(5);
    let batch = noise_batch_at::<C>(&mut stream, &noise, model, true, &data.0[..2], 0.0, Some(&[0.2, 0.7])).unwrap();
    let tape = Tape::<C>::new();
    let p = model.store().bind(&tape);
    let (x, hint) = (tape.constant(batch.x_t.clone()), tape.constant(batch.hint.clone().unwrap()));
    let out = forward_train(model, &p, &x, &hint, &batch.cond, ForwardOptions::lisa(false)).unwrap();
    let loss = t.objective().loss(&out, &batch.y, &batch.levels, 1.0).unwrap();

    let (pred, x_t) = (C::to_vec(&out.pred.value).unwrap(), C::to_vec(&batch.x_t).unwrap());
    let x0: Vec<f32> = data.0[..2].iter().flat_map(|e| e.image.clone()).collect();
    let per = pred.len() / 2;
    let mut sum = 0.0f64;
    for (i, level) in batch.levels.iter().enumerate() {
        for k in i * per..(i + 1) * per {
            let preconditioned = x_t[k] - level.sigma * pred[k];
            sum += ((preconditioned - x0[k]) as f64).powi(2);
        }
    }
    let want = (sum / pred.len() as f64) as f32;
    assert!((loss.main - want).abs() <= 1e-5 * want.abs().max(1.0), "{} vs {want}", loss.main);
    // The timesteps are diffusers' shifted σ·1000 on its grid of 1000.
    for (t, level) in batch.cond.t.iter().zip(&batch.levels) {
        assert!((t - 1000.0 * level.sigma).abs() < 1e-3);
    }
}

/// The README's SD3 section shows the run-file form of `NoiseConfig::sd3()`.
#[test]
fn the_readme_sd3_noise_block_is_sd3() {
    #[derive(serde::Deserialize)]
    struct File {
        train: Train,
    }
    #[derive(serde::Deserialize)]
    struct Train {
        noise: NoiseConfig,
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("### SD3 and SD3.5").nth(1).expect("the README's SD3 section");
    let block = section.split("```toml").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
    let file: File = toml::from_str(block).unwrap();
    assert_eq!(file.train.noise, NoiseConfig::sd3());
}

/// bf16 and fp16 autocast runs of the SD3 fixture (the transformer stored in the half type,
/// the ControlNet and decoder autocast with f32 masters) track the f32 run step by step over
/// 12 steps, within the tolerance `lisa_core::tolerance` names for autocast training.
#[test]
fn sd3_autocast_training_tracks_the_f32_run() {
    use lisa_core::tolerance::autocast_training_loss;
    let dir = scratch("autocast");
    let (embeds, data) = (embeddings(&dir), Latents::new());
    let run = |precision: &str| -> Vec<StepStats> {
        let mut spec = spec(&embeds);
        spec.config.insert("mixed_precision".into(), json!(precision));
        let mut model = registry::build::<C>(&spec, Parts::Dual { decoder: true }, Default::default(), 3).unwrap();
        model.load_main(&fixture("transformer")).unwrap();
        model.load_side(&fixture("controlnet")).unwrap();
        let mut config = TrainConfig { batch_size: 2, max_train_steps: 12, seed: 11, ..TrainConfig::default() };
        config.noise = NoiseConfig::sd3();
        config.optim.lr = 1e-3;
        let mut t = Trainer::new(model, config).unwrap();
        (0..12).map(|_| t.step(&data).unwrap()).collect()
    };
    let want = run("no");
    for (precision, dtype) in [("bf16", DType::BF16), ("fp16", DType::F16)] {
        let got = run(precision);
        let tol = autocast_training_loss(dtype);
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&want) {
            assert!(!g.skipped, "{precision}: step {} skipped", g.step);
            for (name, a, b) in [("main", g.main_loss, w.main_loss), ("lisa", g.lisa_loss, w.lisa_loss)] {
                worst = worst.max((a - b).abs() as f64 / b.abs() as f64);
                assert!(tol.accepts(a as f64, b as f64), "{precision}: step {} {name} loss {a} vs f32 {b}", g.step);
            }
        }
        eprintln!("{precision}: worst relative loss difference over 12 steps {worst:.2e}");
    }
}
