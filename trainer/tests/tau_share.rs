//! The shares of τ per timestep bucket (trainer/src/analysis/tau_share.rs): zero for an untrained side
//! network and decoder, the same on every call, measured against the same τ as the training
//! step's LISA distance, and bad requests refused.

mod common;

use common::tiny_model;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::analysis::tau_share::tau_shares;
use lisa_trainer::data::{Dataset, Example, FillCircles};
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

fn trainer(mode: Mode) -> Trainer<C> {
    let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: mode == Mode::Lisa }, CpuDevice, 7).unwrap();
    let mut cfg = TrainConfig {
        seed: 7,
        batch_size: 8,
        max_train_steps: 60,
        mode,
        optim: OptimConfig { lr: 2e-3, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    cfg.lisa.lambda = 1.0;
    Trainer::new(model, cfg).unwrap()
}

fn examples(n: usize) -> Vec<Example> {
    let set = FillCircles { resolution: 16, len: n, seed: 11 };
    (0..n).map(|i| set.get(i).unwrap()).collect()
}

#[test]
fn untrained_shares_are_zero_and_training_moves_them() {
    let mut t = trainer(Mode::Lisa);
    let val = examples(8);
    let shares =
        |t: &Trainer<C>| tau_shares(t.model.as_ref(), &t.config.lisa, &t.config.noise, None, &val, 4, 5).unwrap();
    let before = shares(&t);
    assert_eq!(before.len(), 4);
    for (b, s) in before.iter().enumerate() {
        assert_eq!((s.from, s.to), (b as f32 / 4.0, (b + 1) as f32 / 4.0));
        assert!(s.zero_distance > 0.0, "bucket {b}: τ has energy");
        // Zero-initialised decoder output and zero convolutions: both explain nothing.
        assert_eq!(s.decoder, Some(0.0), "bucket {b}");
        assert_eq!(s.control, 0.0, "bucket {b}");
    }
    assert_eq!(before, shares(&t), "the same draws on every call");
    let data = FillCircles { resolution: 16, len: 256, seed: 3 };
    for _ in 0..60 {
        t.step(&data).unwrap();
    }
    let after = shares(&t);
    for (b, (s, s0)) in after.iter().zip(&before).enumerate() {
        assert_eq!(s.zero_distance, s0.zero_distance, "bucket {b}: the prior is frozen, so τ is the same");
        let (dec, ctrl) = (s.decoder.unwrap(), s.control);
        assert!(dec.is_finite() && ctrl.is_finite() && dec != 0.0 && ctrl != 0.0, "bucket {b}: {s:?}");
        assert!(dec < 1.0 && ctrl < 1.0, "bucket {b}: a share is at most 1: {s:?}");
    }
    assert!(after.iter().any(|s| s.control > 0.0), "training makes the residuals explain some of τ: {after:?}");
}

#[test]
fn a_baseline_model_has_no_decoder_share() {
    let t = trainer(Mode::Baseline);
    let shares = tau_shares(t.model.as_ref(), &t.config.lisa, &t.config.noise, None, &examples(4), 2, 0).unwrap();
    assert!(shares.iter().all(|s| s.decoder.is_none() && s.control == 0.0), "{shares:?}");
}

#[test]
fn no_buckets_or_no_examples_is_an_error() {
    let t = trainer(Mode::Lisa);
    let (lisa, noise) = (&t.config.lisa, &t.config.noise);
    let message = |r: lisa_trainer::error::Result<_>| r.map(|_: Vec<_>| ()).unwrap_err().to_string();
    assert!(message(tau_shares(t.model.as_ref(), lisa, noise, None, &examples(4), 0, 0)).contains("bucket"));
    assert!(message(tau_shares(t.model.as_ref(), lisa, noise, None, &[], 3, 0)).contains("example"));
}
