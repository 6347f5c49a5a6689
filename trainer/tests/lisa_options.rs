//! The LISA term's training options beyond the paper: the decoder's own learning rate, its
//! output convolution's initialisation, and τ normalised per timestep.

mod common;

use common::tiny_model;
use lisa_core::TargetSpace;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::analysis::tau_share::tau_shares;
use lisa_trainer::data::{Dataset, Example, FillCircles};
use lisa_trainer::model::{DECODER, OutputInit, Parts, SIDE, registry};
use lisa_trainer::objective::{TauNorm, TauNormConfig, measure_tau_norm};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::scheduler::NoiseProcess;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

fn trainer(output_init: OutputInit, options: impl FnOnce(&mut TrainConfig)) -> Trainer<C> {
    let mut spec = tiny_model();
    spec.decoder.output_init = output_init;
    let model = registry::build::<C>(&spec, Parts::Dual { decoder: true }, CpuDevice, 7).unwrap();
    let mut cfg = TrainConfig {
        seed: 7,
        batch_size: 8,
        max_train_steps: 20,
        mode: Mode::Lisa,
        optim: OptimConfig { lr: 2e-3, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    options(&mut cfg);
    Trainer::new(model, cfg).unwrap()
}

fn data() -> FillCircles {
    FillCircles { resolution: 16, len: 64, seed: 3 }
}

fn examples(n: usize) -> Vec<Example> {
    let set = FillCircles { resolution: 16, len: n, seed: 11 };
    (0..n).map(|i| set.get(i).unwrap()).collect()
}

/// `(name, values)` of every parameter whose name starts with `prefix`.
fn params(t: &Trainer<C>, prefix: &str) -> Vec<(String, Vec<f32>)> {
    t.model
        .store()
        .iter()
        .filter(|(_, p)| p.name.starts_with(prefix))
        .map(|(_, p)| (p.name.clone(), C::to_vec(&p.value).unwrap()))
        .collect()
}

#[test]
fn the_decoder_lr_scale_scales_only_the_decoders_first_update() {
    let (mut one, mut four) =
        (trainer(OutputInit::Zero, |_| {}), trainer(OutputInit::Zero, |c| c.decoder_lr_scale = 4.0));
    let before = params(&one, DECODER);
    assert_eq!(before, params(&four, DECODER), "the same initial decoder");
    let d = data();
    let (s1, s4) = (one.step(&d).unwrap(), four.step(&d).unwrap());
    assert_eq!(s1, s4, "the same gradients and statistics at the first step");
    assert_eq!(params(&one, SIDE), params(&four, SIDE), "the side network's update does not change");
    let mut moved = 0;
    for (((name, p0), (_, p1)), (_, p4)) in before.iter().zip(params(&one, DECODER)).zip(params(&four, DECODER)) {
        for ((a, b), c) in p0.iter().zip(&p1).zip(&p4) {
            let (d1, d4) = (b - a, c - a);
            if d1 != 0.0 {
                moved += 1;
                // AdamW's first step is lr·(m̂/(√v̂ + ε) + wd·p): linear in lr, up to the
                // rounding of the updated weights (a few ulps of the weight).
                let ulps = 8.0 * f32::EPSILON * a.abs().max(c.abs());
                assert!((d4 - 4.0 * d1).abs() <= ulps + 1e-12, "{name}: update {d4} vs 4·{d1}");
            }
        }
    }
    assert!(moved > 0, "the decoder moved");
}

#[test]
fn a_bad_decoder_lr_scale_is_refused() {
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let spec = tiny_model();
        let model = registry::build::<C>(&spec, Parts::Dual { decoder: true }, CpuDevice, 7).unwrap();
        let cfg = TrainConfig { decoder_lr_scale: bad, ..TrainConfig::default() };
        let err = Trainer::new(model, cfg).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("decoder_lr_scale"), "{bad}: {err}");
    }
}

#[test]
fn a_lecun_normal_output_conv_makes_the_decoder_speak_from_step_zero() {
    let zero = trainer(OutputInit::Zero, |_| {});
    let lecun = trainer(OutputInit::LecunNormal, |_| {});
    let out = |t: &Trainer<C>| params(t, "lisa.conv_out.weight").remove(0).1;
    assert!(out(&zero).iter().all(|&v| v == 0.0));
    let w = out(&lecun);
    let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    // LeCun normal: std 1/√fan_in, fan_in = 4 channels × 3 × 3.
    assert!((rms - 1.0 / 6.0).abs() < 0.05, "rms {rms}");
    let share = |t: &Trainer<C>| {
        tau_shares(t.model.as_ref(), &t.config.lisa, &t.config.noise, None, &examples(8), 2, 0).unwrap()
    };
    assert!(share(&zero).iter().all(|s| s.decoder == Some(0.0)));
    assert!(share(&lecun).iter().all(|s| s.decoder.is_some_and(|d| d != 0.0)), "{:?}", share(&lecun));
}

#[test]
fn a_normalised_tau_has_unit_scale_at_every_timestep() {
    // In score units τ = (y − prior)/σ_t spans two orders of magnitude over the schedule:
    // normalised, each bucket's mean τ² is about 1.
    let score = |c: &mut TrainConfig| c.lisa.target_space = TargetSpace::Score;
    let mut plain = trainer(OutputInit::Zero, score);
    let mut normed = trainer(OutputInit::Zero, |c| {
        score(c);
        c.normalize_tau = Some(TauNormConfig { buckets: 10, examples: 16 });
    });
    let d = data();
    assert!(plain.tau_norm(&d).unwrap().is_none(), "off unless asked for");
    let norm = normed.tau_norm(&d).unwrap().unwrap().clone();
    assert_eq!(norm.rms().len(), 10);
    assert!(norm.rms()[0] > 10.0 * norm.rms()[9], "score units grow toward low noise: {:?}", norm.rms());
    let val = examples(16);
    let (t, n) = (&normed, Some(&norm));
    let shares = tau_shares(t.model.as_ref(), &t.config.lisa, &t.config.noise, n, &val, 5, 1).unwrap();
    for s in &shares {
        assert!((0.6..1.6).contains(&s.zero_distance), "bucket [{}, {}): mean τ² {}", s.from, s.to, s.zero_distance);
    }
    let raw = tau_shares(t.model.as_ref(), &t.config.lisa, &t.config.noise, None, &val, 5, 1).unwrap();
    assert!(raw[0].zero_distance > 50.0 * raw[4].zero_distance, "{raw:?}");
    // The training step's LISA term uses the same normalised τ.
    let (a, b) = (plain.step(&d).unwrap(), normed.step(&d).unwrap());
    assert_eq!(a.main_loss, b.main_loss, "normalising changes only the LISA term");
    assert!(a.lisa_zero_distance != b.lisa_zero_distance && (0.3..3.0).contains(&b.lisa_zero_distance), "{a:?} {b:?}");
}

#[test]
fn measuring_tau_is_repeatable_and_bad_settings_are_refused() {
    let t = trainer(OutputInit::Zero, |_| {});
    let process = NoiseProcess::new(&t.config.noise).unwrap();
    let ex = examples(12);
    let cfg = TauNormConfig { buckets: 3, examples: 12 };
    let measure =
        |cfg: &TauNormConfig, chunk| measure_tau_norm(t.model.as_ref(), &t.config.lisa, &process, &ex, cfg, chunk, 5);
    let a = measure(&cfg, 5).unwrap();
    assert_eq!(a, measure(&cfg, 5).unwrap(), "the same draws each time");
    assert!(a.rms().iter().all(|r| r.is_finite() && *r > 0.0));
    for bad in [TauNormConfig { buckets: 0, examples: 4 }, TauNormConfig { buckets: 4, examples: 0 }] {
        assert!(measure(&bad, 5).unwrap_err().to_string().contains("normalize_tau"), "{bad:?}");
        let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: true }, CpuDevice, 7).unwrap();
        let err = Trainer::new(model, TrainConfig { normalize_tau: Some(bad), ..TrainConfig::default() });
        assert!(err.map(|_| ()).unwrap_err().to_string().contains("normalize_tau"));
    }
}

#[test]
fn a_tau_scale_table_must_grow_in_sigma_and_be_positive() {
    let err = |s: Vec<f32>, r: Vec<f32>| TauNorm::new(s, r).unwrap_err().to_string();
    assert!(err(vec![0.1, 0.1], vec![1.0, 1.0]).contains("do not grow"));
    assert!(err(vec![0.1, 0.2], vec![1.0, 0.0]).contains("cannot be normalised"));
    assert!(err(vec![0.1, 0.2], vec![1.0, f32::NAN]).contains("cannot be normalised"));
    assert!(err(vec![0.1], vec![1.0, 2.0]).contains("one σ and one rms per bucket"));
    let norm = TauNorm::new(vec![0.1, 0.5], vec![2.0, 4.0]).unwrap();
    let level = |sigma: f32| lisa_core::NoiseLevel { alpha: (1.0 - sigma * sigma).sqrt(), sigma };
    assert_eq!((norm.bucket(&level(0.05)), norm.bucket(&level(0.3)), norm.bucket(&level(0.9))), (0, 0, 1));
    assert_eq!(norm.factor(&level(0.7)), 0.25);
}
