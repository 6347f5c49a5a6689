//! Checkpoints: exact resume, validation of bad files, atomicity, and readability by
//! Python's safetensors.

use std::path::{Path, PathBuf};

mod common;

use common::tiny_model;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::TrainError;
use lisa_trainer::checkpoint::{load_checkpoint, save_checkpoint};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};
use lisa_trainer::weights::read_safetensors;

fn trainer(ema: bool) -> Trainer<C> {
    let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: true }, CpuDevice, 7).unwrap();
    let cfg = TrainConfig {
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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resume_reproduces_the_uninterrupted_run_bit_for_bit() {
    let d = data();
    let mut straight = trainer(true);
    let stats_a: Vec<_> = (0..6).map(|_| straight.step(&d).unwrap()).collect();

    let dir = tmp("resume");
    let mut first = trainer(true);
    for _ in 0..3 {
        first.step(&d).unwrap();
    }
    save_checkpoint(&first, &dir.join("checkpoint-3")).unwrap();
    drop(first);
    let mut resumed = trainer(true);
    load_checkpoint(&mut resumed, &dir.join("checkpoint-3")).unwrap();
    assert_eq!(resumed.run.state.step, 3);
    let stats_b: Vec<_> = (0..3).map(|_| resumed.step(&d).unwrap()).collect();
    assert_eq!(&stats_a[3..], &stats_b[..], "step statistics after resume");
    assert!(snapshot(&straight) == snapshot(&resumed), "weights, moments and EMA equal bit for bit");
    std::fs::remove_dir_all(dir).unwrap();
}

fn expect_checkpoint_error(t: &mut Trainer<C>, dir: &Path, needle: &str) {
    let before = snapshot(t);
    let state = t.run.state;
    match load_checkpoint(t, dir) {
        Err(e @ TrainError::Checkpoint { .. }) | Err(e @ TrainError::Io { .. }) => {
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
    save_checkpoint(&t, &good).unwrap();
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
    expect_checkpoint_error(&mut fresh, &c, "not a valid safetensors file");

    // A renamed tensor.
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
    expect_checkpoint_error(&mut fresh, &c, "missing tensor side.zero_mid.bias");

    // A different model (wrong shapes): a checkpoint of a wider network.
    let mut wide_cfg = tiny_model();
    wide_cfg.config["unet"]["channels"] = serde_json::json!([8, 32]);
    let wide = Trainer::new(
        registry::build::<C>(&wide_cfg, Parts::Dual { decoder: true }, CpuDevice, 7).unwrap(),
        trainer(false).config.clone(),
    )
    .unwrap();
    let w = dir.join("wide");
    save_checkpoint(&wide, &w).unwrap();
    std::fs::copy(w.join("model.safetensors"), copy("shapes").join("model.safetensors")).unwrap();
    expect_checkpoint_error(&mut fresh, &dir.join("shapes"), "shape");
    expect_checkpoint_error(&mut fresh, &w, "different model configuration");

    // Corrupt state, missing directory, a different run.
    let c = copy("state");
    std::fs::write(c.join("state.json"), b"{\"format_version\": 1, \"state\": ").unwrap();
    expect_checkpoint_error(&mut fresh, &c, "invalid state file");
    expect_checkpoint_error(&mut fresh, &dir.join("nope"), "no such checkpoint directory");
    let mut other_seed = trainer(false);
    other_seed.config.seed = 99;
    expect_checkpoint_error(&mut other_seed, &good, "different training configuration");

    // The good one still loads.
    load_checkpoint(&mut fresh, &good).unwrap();
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
    save_checkpoint(&t, &ck).unwrap();
    t.step(&d).unwrap();
    save_checkpoint(&t, &ck).unwrap();
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
    let t = trainer(false);
    save_checkpoint(&t, &dir.join("ck")).unwrap();
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
