//! Mixed precision on the tiny SD fixture: autocast bf16 and fp16 training track the f32 run
//! over 20 steps, fp16 loss scaling skips overflowing steps and moves its scale as torch's
//! `GradScaler` does, and a run with loss scaling resumes exactly from a checkpoint.

mod common;

use std::path::{Path, PathBuf};

use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_core::loss_scale::LossScaleConfig;
use lisa_core::tolerance::autocast_training_loss;
use lisa_cpu::CpuBackend as C;
use lisa_trainer::checkpoint::{load_checkpoint, save_checkpoint};
use lisa_trainer::data::{Dataset, Example};
use lisa_trainer::model::sd::{SdModel, read_json_config};
use lisa_trainer::model::{DualDenoiser, ModelSpec, Parts, SIDE};
use lisa_trainer::train::{StepStats, TrainConfig, Trainer};
use lisa_trainer::weights::to_safetensors;
use serde_json::json;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/sd15").join(case)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-sd-mixed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Four examples: 8×8 latents (4 channels), 64×64 condition images of a ring, two prompts.
struct Rings(Vec<Example>);

impl Rings {
    fn new() -> Self {
        let examples = (0..4)
            .map(|i| {
                let image = (0..4 * 8 * 8).map(|k| ((k * 7 + i * 13) % 17) as f32 / 8.5 - 1.0).collect();
                let hint = (0..3 * 64 * 64)
                    .map(|k| {
                        let (y, x) = ((k % 4096) / 64, k % 64);
                        let r = (((x as f32 - 32.0).powi(2) + (y as f32 - 32.0).powi(2)).sqrt() - 8.0 - 4.0 * i as f32)
                            .abs();
                        if r < 2.0 { 1.0 } else { 0.0 }
                    })
                    .collect();
                Example { image, hint, prompt: if i % 2 == 0 { "a ring".into() } else { String::new() } }
            })
            .collect();
        Self(examples)
    }
}

impl Dataset for Rings {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize) -> lisa_trainer::Result<Example> {
        Ok(self.0[i].clone())
    }
}

/// The prompts' embeddings (5 tokens of the fixture's 12 dims), written once per test.
fn embeddings(dir: &Path) -> PathBuf {
    let path = dir.join("prompt_embeds.safetensors");
    let made: Vec<(String, lisa_cpu::CpuTensor)> = [("a ring", 7u64), ("", 8)]
        .iter()
        .map(|(p, seed)| {
            (p.to_string(), C::random_normal(&Shape::new([5, 12]), *seed, DType::F32, &Default::default()).unwrap())
        })
        .collect();
    let refs: Vec<(String, &lisa_cpu::CpuTensor)> = made.iter().map(|(n, t)| (n.clone(), t)).collect();
    std::fs::write(&path, to_safetensors::<C>(&refs, Default::default()).unwrap()).unwrap();
    path
}

fn spec(precision: &str) -> ModelSpec {
    let mut config = serde_json::Map::new();
    config.insert("unet".into(), read_json_config(&fixture("unet")).unwrap().into());
    config.insert("controlnet".into(), read_json_config(&fixture("controlnet")).unwrap().into());
    config.insert("mixed_precision".into(), json!(precision));
    let mut spec = ModelSpec { architecture: "sd".into(), decoder: Default::default(), config };
    spec.decoder.hook = Some("mid".parse().unwrap());
    spec
}

fn trainer(precision: &str, loss_scale: LossScaleConfig, embeds: &Path) -> Trainer<C> {
    let mut model = SdModel::<C>::new(&spec(precision), Parts::Dual { decoder: true }, Default::default(), 3).unwrap();
    model.load_main(&fixture("unet")).unwrap();
    model.load_controlnet(&fixture("controlnet")).unwrap();
    model.read_text_embeddings(embeds, None).unwrap();
    let mut config = TrainConfig { batch_size: 2, max_train_steps: 20, seed: 11, loss_scale, ..TrainConfig::default() };
    config.optim.lr = 1e-3;
    Trainer::new(Box::new(model), config).unwrap()
}

fn side_weights(t: &Trainer<C>) -> Vec<f32> {
    let store = t.model.store();
    store.iter().filter(|(_, p)| p.name.starts_with(SIDE)).flat_map(|(_, p)| C::to_vec(&p.value).unwrap()).collect()
}

fn run(t: &mut Trainer<C>, data: &Rings, steps: usize) -> Vec<StepStats> {
    (0..steps).map(|_| t.step(data).unwrap()).collect()
}

/// The autocast runs' losses follow the f32 run's, step by step, over 20 steps of training
/// (AdamW at lr 1e-3 moves the ControlNet well away from its start), within the tolerance
/// `lisa_core::tolerance` names per half type.
#[test]
fn bf16_and_fp16_training_track_the_f32_run_over_20_steps() {
    let dir = scratch("track");
    let (embeds, data) = (embeddings(&dir), Rings::new());
    let mut reference = trainer("no", LossScaleConfig::default(), &embeds);
    let want = run(&mut reference, &data, 20);
    assert!(want.iter().all(|s| s.loss_scale.is_none() && !s.skipped), "no loss scaling in f32");
    let w0 = side_weights(&trainer("no", LossScaleConfig::default(), &embeds));
    let moved = side_weights(&reference).iter().zip(&w0).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 5e-3, "the f32 run barely trained (max weight change {moved})");
    for (precision, dtype) in [("bf16", DType::BF16), ("fp16", DType::F16)] {
        let mut t = trainer(precision, LossScaleConfig::default(), &embeds);
        let got = run(&mut t, &data, 20);
        let tol = autocast_training_loss(dtype);
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&want) {
            assert!(!g.skipped, "{precision}: step {} skipped", g.step);
            assert_eq!(g.loss_scale.is_some(), dtype == DType::F16, "{precision}: loss scaling only in fp16");
            for (name, a, b) in [("main", g.main_loss, w.main_loss), ("lisa", g.lisa_loss, w.lisa_loss)] {
                worst = worst.max((a - b).abs() as f64 / b.abs() as f64);
                assert!(
                    tol.accepts(a as f64, b as f64),
                    "{precision}: step {} {name} loss {a} vs f32 {b} (tolerance {tol:?})",
                    g.step
                );
            }
        }
        eprintln!("{precision}: worst relative loss difference over 20 steps {worst:.2e}");
    }
}

/// With a scale far too large for fp16 (2⁴⁰), every gradient overflows: the steps are skipped
/// (no weight moves, AdamW does not count them) and the scale halves each time, until the
/// gradients fit and training proceeds; after `growth_interval` good steps it doubles.
#[test]
fn fp16_loss_scaling_skips_overflowing_steps_and_moves_the_scale() {
    let dir = scratch("skip");
    let (embeds, data) = (embeddings(&dir), Rings::new());
    let mut t = trainer("fp16", LossScaleConfig { init_log2: 40, growth_interval: 3 }, &embeds);
    let start = side_weights(&t);
    let mut skipped = 0;
    loop {
        let s = t.step(&data).unwrap();
        assert_eq!(s.loss_scale, Some(2f32.powi(40 - skipped)));
        if !s.skipped {
            break;
        }
        skipped += 1;
        assert!(s.loss.is_finite(), "the forward is finite; only the scaled gradients overflow");
        assert_eq!(side_weights(&t), start, "a skipped step changed a weight");
        assert_eq!(t.optimizer.adamw.step, 0, "AdamW counted a skipped step");
        assert!(skipped < 30, "the scale never came down");
    }
    assert!(skipped >= 10, "2^40 should overflow fp16 gradients for several halvings, skipped {skipped}");
    assert_ne!(side_weights(&t), start, "the first good step trained");
    assert_eq!(t.run.state.skipped_steps, skipped as u64);
    assert_eq!(t.optimizer.adamw.step, 1);
    let scale = 2f32.powi(40 - skipped);
    let next = run(&mut t, &data, 2);
    assert!(next.iter().all(|s| !s.skipped && s.loss_scale == Some(scale)));
    assert!(next[1].scale_grew, "three good steps in a row double the scale");
    assert_eq!(t.run.state.loss_scale.unwrap().log2, 41 - skipped);
}

/// A run with fp16 loss scaling saved mid-way and resumed gives the uninterrupted run's
/// weights, scale and skipped-step count, bit for bit.
#[test]
fn a_loss_scaled_run_resumes_exactly() {
    let dir = scratch("resume");
    let (embeds, data) = (embeddings(&dir), Rings::new());
    let config = LossScaleConfig { init_log2: 20, growth_interval: 2 };
    let mut straight = trainer("fp16", config, &embeds);
    let all = run(&mut straight, &data, 12);
    let events: Vec<_> = all.iter().map(|s| (s.loss_scale.unwrap().log2() as i32, s.skipped, s.scale_grew)).collect();
    assert!(all.iter().any(|s| s.skipped) && all.iter().any(|s| s.scale_grew), "both events in 12 steps: {events:?}");
    let mut first = trainer("fp16", config, &embeds);
    run(&mut first, &data, 7);
    let ckpt = dir.join("checkpoint-7");
    save_checkpoint(&mut first, &data, &ckpt).unwrap();
    let mut resumed = trainer("fp16", config, &embeds);
    load_checkpoint(&mut resumed, &data, &ckpt).unwrap();
    assert_eq!(resumed.run.state, first.run.state);
    let rest = run(&mut resumed, &data, 5);
    assert_eq!(resumed.run.state, straight.run.state);
    assert!(side_weights(&resumed) == side_weights(&straight), "the resumed run's weights differ");
    for (a, b) in rest.iter().zip(&all[7..]) {
        assert_eq!((a.loss.to_bits(), a.loss_scale, a.skipped), (b.loss.to_bits(), b.loss_scale, b.skipped));
    }
}

/// A NaN that does not come from fp16's range (here in the data): under loss scaling its steps
/// are skipped as torch skips them, and once the scale is at its floor the run stops with an
/// error naming the step instead of skipping forever. Without loss scaling it is an error at once.
#[test]
fn a_nan_in_the_data_skips_then_stops_under_fp16_and_stops_at_once_in_f32() {
    let dir = scratch("nan");
    let embeds = embeddings(&dir);
    let mut data = Rings::new();
    for e in &mut data.0 {
        e.image[0] = f32::NAN;
    }
    let mut t = trainer("fp16", LossScaleConfig { init_log2: -125, growth_interval: 2000 }, &embeds);
    let start = side_weights(&t);
    let s = t.step(&data).unwrap();
    assert!(s.skipped && !s.loss.is_finite(), "{s:?}");
    assert_eq!(side_weights(&t), start);
    let err = t.step(&data).unwrap_err().to_string();
    assert!(err.contains("smallest loss scale") && err.contains('2'), "{err}");
    let mut f32_run = trainer("no", LossScaleConfig::default(), &embeds);
    let err = f32_run.step(&data).unwrap_err().to_string();
    assert!(err.contains("loss"), "{err}");
}

/// Two data-parallel ranks under fp16 loss scaling, rank 1's data NaN: its forward fails,
/// the averaged loss makes both ranks skip the same step and halve the same scale, and both
/// stop together at the floor; no weight moves on either.
#[test]
fn under_fp16_every_rank_skips_the_steps_one_rank_overflows() {
    use common::on_threads;
    use lisa_trainer::distributed::{DataParallel, thread_group};
    let dir = scratch("ranks");
    let embeds = embeddings(&dir);
    let results = on_threads(thread_group(2, std::time::Duration::from_secs(120)), |r, rank| {
        let mut data = Rings::new();
        if r == 1 {
            data.0.iter_mut().for_each(|e| e.image[0] = f32::NAN);
        }
        let mut t = trainer("fp16", LossScaleConfig { init_log2: -125, growth_interval: 2000 }, &embeds);
        t.config.batch_size = 1;
        t.join(DataParallel::new(Box::new(rank)));
        let start = side_weights(&t);
        let mut stats = Vec::new();
        let error = loop {
            match t.step(&data) {
                Ok(s) => stats.push(s),
                Err(e) => break e.to_string(),
            }
        };
        (stats, error, side_weights(&t) == start)
    });
    for (r, (stats, error, unmoved)) in results.iter().enumerate() {
        assert_eq!(stats.len(), 1, "rank {r}: one skipped step at 2^-125, then the floor: {error}");
        assert!(stats[0].skipped && stats[0].loss.is_nan() && stats[0].loss_scale == Some(2f32.powi(-125)));
        assert!(error.contains("smallest loss scale"), "rank {r}: {error}");
        assert!(unmoved, "rank {r}: a weight moved");
    }
}
