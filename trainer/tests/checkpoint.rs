//! Checkpoints: exact resume, validation of bad files, atomicity, and readability by
//! Python's safetensors.

use std::path::{Path, PathBuf};

mod common;

use common::tiny_model;
use lisa_core::backend::DType;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::TrainError;
use lisa_trainer::checkpoint::{StateFile, load_checkpoint, save_checkpoint};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::objective::TauNormConfig;
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};
use lisa_trainer::weights::read_safetensors;

fn trainer(ema: bool) -> Trainer<C> {
    trainer_with(ema, |_| {})
}

/// [`trainer`] with `options` applied to its settings.
fn trainer_with(ema: bool, options: impl FnOnce(&mut TrainConfig)) -> Trainer<C> {
    let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: true }, CpuDevice, 7).unwrap();
    let mut cfg = TrainConfig {
        seed: 7,
        batch_size: 6,
        gradient_accumulation_steps: 2,
        max_train_steps: 6,
        mode: Mode::Lisa,
        ema_decay: ema.then_some(0.9),
        optim: OptimConfig {
            lr: 1e-3,
            warmup_steps: 2,
            schedule: lisa_trainer::optim::LrSchedule::Cosine,
            ..OptimConfig::default()
        },
        ..TrainConfig::default()
    };
    options(&mut cfg);
    Trainer::new(model, cfg).unwrap()
}

fn data() -> FillCircles {
    // 20 examples: 12 per step, so epochs wrap mid-run.
    FillCircles { resolution: 16, len: 20, seed: 1 }
}

fn snapshot(t: &Trainer<C>) -> Vec<(String, Vec<u32>)> {
    let mut out: Vec<_> = t
        .model
        .store()
        .iter()
        .map(|(_, p)| (p.name.clone(), C::to_vec(&p.value).unwrap().iter().map(|v| v.to_bits()).collect()))
        .collect();
    for (id, m, v) in &t.optimizer.adamw.moments {
        let name = &t.model.store().get(*id).name;
        out.push((format!("{name}/m"), C::to_vec(m).unwrap().iter().map(|v| v.to_bits()).collect()));
        out.push((format!("{name}/v"), C::to_vec(v).unwrap().iter().map(|v| v.to_bits()).collect()));
    }
    if let Some(e) = &t.optimizer.ema {
        for (id, s) in &e.shadow {
            out.push((
                format!("{}/ema", t.model.store().get(*id).name),
                C::to_vec(s).unwrap().iter().map(|v| v.to_bits()).collect(),
            ));
        }
    }
    out
}

/// Rewrites the digest of `file` in `dir/state.json` (to test what lies behind the digest).
fn rehash(dir: &Path, file: &str) {
    let path = dir.join("state.json");
    let mut state: StateFile<TrainConfig> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    state.files.insert(file.into(), lisa_trainer::weights::digest(&std::fs::read(dir.join(file)).unwrap()));
    std::fs::write(path, state.to_bytes().unwrap()).unwrap();
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    resume_matches_straight("resume", |_| {});
}

#[test]
fn resume_with_a_normalised_tau_and_a_decoder_lr_reproduces_the_run() {
    // τ's scale is measured again after the resume: it must come out the same.
    resume_matches_straight("resume-options", |c| {
        c.decoder_lr_scale = 4.0;
        c.normalize_tau = Some(TauNormConfig { buckets: 4, examples: 8 });
    });
}

fn resume_matches_straight(name: &str, options: impl Fn(&mut TrainConfig)) {
    let d = data();
    let mut straight = trainer_with(true, &options);
    let stats_a: Vec<_> = (0..6).map(|_| straight.step(&d).unwrap()).collect();

    let dir = tmp(name);
    let mut first = trainer_with(true, &options);
    for _ in 0..3 {
        first.step(&d).unwrap();
    }
    save_checkpoint(&mut first, &d, &dir.join("checkpoint-3")).unwrap();
    drop(first);
    let mut resumed = trainer_with(true, &options);
    load_checkpoint(&mut resumed, &d, &dir.join("checkpoint-3")).unwrap();
    assert_eq!(resumed.run.state.step, 3);
    let stats_b: Vec<_> = (0..3).map(|_| resumed.step(&d).unwrap()).collect();
    assert_eq!(&stats_a[3..], &stats_b[..], "step statistics after resume");
    assert!(snapshot(&straight) == snapshot(&resumed), "weights, moments and EMA equal bit for bit");
    std::fs::remove_dir_all(dir).unwrap();
}

fn expect_checkpoint_error(t: &mut Trainer<C>, dir: &Path, needle: &str) {
    let before = snapshot(t);
    let state = t.run.state;
    match load_checkpoint(t, &data(), dir) {
        Err(e @ (TrainError::Checkpoint { .. } | TrainError::File { .. } | TrainError::Io { .. })) => {
            assert!(e.to_string().contains(needle), "error {e:?} should mention {needle:?}")
        }
        other => panic!("expected a checkpoint error mentioning {needle:?}, got {:?}", other.map(|_| ())),
    }
    assert!(snapshot(t) == before && t.run.state == state, "a failed load must leave the trainer unchanged");
}

#[test]
fn bad_checkpoints_are_rejected_and_change_nothing() {
    let d = data();
    let dir = tmp("bad");
    let mut t = trainer(false);
    t.step(&d).unwrap();
    let good = dir.join("good");
    save_checkpoint(&mut t, &d, &good).unwrap();
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            std::fs::copy(good.join(f), to.join(f)).unwrap();
        }
        to
    };
    let mut fresh = trainer(false);

    // Truncated weights.
    let c = copy("truncated");
    let bytes = std::fs::read(c.join("model.safetensors")).unwrap();
    std::fs::write(c.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    expect_checkpoint_error(&mut fresh, &c, "does not match the digest");
    rehash(&c, "model.safetensors");
    expect_checkpoint_error(&mut fresh, &c, "not a valid safetensors file");

    // A flipped byte in tensor data: the digest in state.json no longer matches.
    let c = copy("flipped");
    let mut bytes = std::fs::read(c.join("model.safetensors")).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(c.join("model.safetensors"), &bytes).unwrap();
    expect_checkpoint_error(&mut fresh, &c, "does not match the digest");

    // Files of two checkpoints mixed: the optimizer state of a later step.
    let c = copy("mixed");
    let mut later = trainer(false);
    later.step(&d).unwrap();
    later.step(&d).unwrap();
    save_checkpoint(&mut later, &d, &dir.join("later")).unwrap();
    std::fs::copy(dir.join("later/optimizer.safetensors"), c.join("optimizer.safetensors")).unwrap();
    expect_checkpoint_error(&mut fresh, &c, "does not match the digest");

    // A renamed tensor (its digest updated, so that the names are what fails).
    let c = copy("renamed");
    let bytes = std::fs::read(c.join("model.safetensors")).unwrap();
    // Header: 8-byte little-endian length, then JSON; rename inside it, keeping the length.
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + len]).unwrap();
    let mut renamed = bytes.clone();
    let name = "side.zero_mid.bias";
    let at = header.find(name).expect("tensor name in header") + 8;
    renamed[at..at + name.len()].copy_from_slice(b"side.zero_mid.bogu");
    std::fs::write(c.join("model.safetensors"), &renamed).unwrap();
    rehash(&c, "model.safetensors");
    expect_checkpoint_error(&mut fresh, &c, "missing tensor side.zero_mid.bias");

    // A different model (wrong shapes): a checkpoint of a wider network.
    let mut wide_cfg = tiny_model();
    wide_cfg.config["unet"]["channels"] = serde_json::json!([8, 32]);
    let mut wide = Trainer::new(
        registry::build::<C>(&wide_cfg, Parts::Dual { decoder: true }, CpuDevice, 7).unwrap(),
        trainer(false).config.clone(),
    )
    .unwrap();
    let w = dir.join("wide");
    save_checkpoint(&mut wide, &d, &w).unwrap();
    std::fs::copy(w.join("model.safetensors"), copy("shapes").join("model.safetensors")).unwrap();
    rehash(&dir.join("shapes"), "model.safetensors");
    expect_checkpoint_error(&mut fresh, &dir.join("shapes"), "shape");
    expect_checkpoint_error(&mut fresh, &w, "different model");

    // An edited state.json (a different step), and one whose version was flipped to 1.
    let c = copy("edited");
    let text = std::fs::read_to_string(c.join("state.json")).unwrap();
    std::fs::write(c.join("state.json"), text.replacen("\"step\": 1", "\"step\": 7", 1)).unwrap();
    expect_checkpoint_error(&mut fresh, &c, "does not match its digest");
    let c = copy("downgraded");
    let text = std::fs::read_to_string(c.join("state.json")).unwrap();
    std::fs::write(c.join("state.json"), text.replacen("\"format_version\": 2", "\"format_version\": 1", 1)).unwrap();
    expect_checkpoint_error(&mut fresh, &c, "claims format 1");

    // Corrupt state, missing directory, a different run.
    let c = copy("state");
    std::fs::write(c.join("state.json"), b"{\"format_version\": 1, \"state\": ").unwrap();
    expect_checkpoint_error(&mut fresh, &c, "not a valid state file");
    expect_checkpoint_error(&mut fresh, &dir.join("nope"), "no such checkpoint directory");
    let mut other_seed = trainer(false);
    other_seed.config.seed = 99;
    expect_checkpoint_error(&mut other_seed, &good, "other settings");

    // Other data (a smaller set, as a shrunk prompt.json would be): refused, no panic.
    let smaller = FillCircles { len: 5, ..data() };
    let before = snapshot(&fresh);
    let err = load_checkpoint(&mut fresh, &smaller, &good).unwrap_err().to_string();
    assert!(err.contains("other data") && err.contains("5 examples"), "{err}");
    assert!(snapshot(&fresh) == before);

    // The good one still loads.
    load_checkpoint(&mut fresh, &d, &good).unwrap();
    assert_eq!(fresh.run.state.step, 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn saving_replaces_an_old_checkpoint_only_when_complete() {
    let d = data();
    let dir = tmp("replace");
    let mut t = trainer(false);
    t.step(&d).unwrap();
    let ck = dir.join("latest");
    save_checkpoint(&mut t, &d, &ck).unwrap();
    t.step(&d).unwrap();
    save_checkpoint(&mut t, &d, &ck).unwrap();
    let names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec!["latest".to_string()], "no temporary or old directories left behind");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(ck.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["state"]["step"], 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// PyTorch users read these files with `safetensors`; check with its Python reader.
#[test]
fn python_safetensors_reads_our_weights() {
    let have_python = std::process::Command::new("python3")
        .args(["-c", "import safetensors.numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_python {
        assert!(std::env::var("CI").is_err(), "CI must have python3 + safetensors (scripts/setup.sh installs them)");
        eprintln!("skipping: python3 with safetensors not available (run scripts/setup.sh)");
        return;
    }
    let dir = tmp("python");
    let mut t = trainer(false);
    save_checkpoint(&mut t, &data(), &dir.join("ck")).unwrap();
    let file = dir.join("ck").join("model.safetensors");
    let ours = read_safetensors(&file).unwrap();
    let script = "import sys, safetensors.numpy as s\nd = s.load_file(sys.argv[1])\nfor k in sorted(d):\n    print(k, 'x'.join(map(str, d[k].shape)), str(d[k].dtype), repr(float(d[k].astype('float64').sum())))";
    let out = std::process::Command::new("python3").args(["-c", script]).arg(&file).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), ours.len());
    for (line, (name, (shape, values))) in lines.iter().zip(&ours) {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts[0], name);
        let dims: Vec<String> = shape.dims().iter().map(|d| d.to_string()).collect();
        assert_eq!(parts[1], dims.join("x"), "{name} shape");
        assert_eq!(parts[2], "float32");
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let py: f64 = parts[3].parse().unwrap();
        assert!((sum - py).abs() <= 1e-9 * (1.0 + sum.abs()), "{name}: {sum} vs {py}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_finite_weights_are_never_saved_and_divergence_names_its_step() {
    let d = data();
    let dir = tmp("nan");
    let mut t = trainer(true);
    t.step(&d).unwrap();
    save_checkpoint(&mut t, &d, &dir.join("checkpoint-1")).unwrap();
    // NaN weights (as a blown-up step would leave them) cannot be written.
    let id = t.model.store().iter().find(|(_, p)| p.trainable).map(|(id, _)| id).unwrap();
    let shape = C::shape(&t.model.store().get(id).value);
    t.model.store_mut().get_mut(id).value = C::full(&shape, f32::NAN, DType::F32, &CpuDevice).unwrap();
    let err = save_checkpoint(&mut t, &d, &dir.join("checkpoint-2")).unwrap_err();
    assert!(matches!(err, TrainError::NonFiniteTensor { .. }), "{err}");
    assert!(!dir.join("checkpoint-2").exists(), "nothing is left under the checkpoint's name");
    let names: Vec<_> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["checkpoint-1"], "no partial folder left behind");

    // A learning rate that blows the weights up: the step fails and names itself.
    let mut wild = trainer(false);
    wild.config.optim.lr = 1e30;
    wild.config.optim.max_grad_norm = None;
    wild.config.optim.warmup_steps = 0;
    let err = (0..4).find_map(|_| wild.step(&d).err()).expect("an lr of 1e30 must diverge");
    assert!(err.to_string().contains("diverged at step"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_resume_may_change_the_learning_rate_and_the_run_length() {
    let d = data();
    let dir = tmp("lr");
    let mut t = trainer(false);
    t.step(&d).unwrap();
    save_checkpoint(&mut t, &d, &dir.join("ck")).unwrap();
    let mut lower = trainer(false);
    lower.config.optim.lr = 1e-4;
    lower.config.max_train_steps = 12;
    load_checkpoint(&mut lower, &d, &dir.join("ck")).unwrap();
    assert_eq!(lower.run.state.step, 1);
    assert_eq!(lower.run_id, t.run_id, "the resumed run keeps its id");
    let s = lower.step(&d).unwrap();
    assert!(s.lr < 2e-4, "the new learning rate is used: {}", s.lr);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn identical_runs_write_identical_files() {
    let d = data();
    let dir = tmp("identical");
    for name in ["a", "b"] {
        let mut t = trainer(true);
        t.step(&d).unwrap();
        t.run_id = "same".into();
        save_checkpoint(&mut t, &d, &dir.join(name)).unwrap();
    }
    for f in ["model.safetensors", "optimizer.safetensors", "ema.safetensors", "state.json"] {
        let (a, b) = (std::fs::read(dir.join("a").join(f)).unwrap(), std::fs::read(dir.join("b").join(f)).unwrap());
        assert!(a == b, "{f} differs between identical runs");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
