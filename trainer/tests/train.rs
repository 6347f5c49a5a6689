//! Training runs on a tiny configuration: the loss falls, baseline equals LISA with λ = 0.

mod common;

use common::tiny_model;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

fn trainer(mode: Mode, lambda: f64, seed: u64) -> Trainer<C> {
    let model =
        registry::build::<C>(&tiny_model(), Parts::Dual { decoder: mode == Mode::Lisa }, CpuDevice, seed).unwrap();
    let mut cfg = TrainConfig {
        seed,
        batch_size: 8,
        max_train_steps: 50,
        mode,
        optim: OptimConfig { lr: 2e-3, ..OptimConfig::default() },
        ..TrainConfig::default()
    };
    cfg.lisa.lambda = lambda;
    Trainer::new(model, cfg).unwrap()
}

#[test]
fn fifty_steps_loss_falls() {
    let data = FillCircles { resolution: 16, len: 256, seed: 3 };
    let mut t = trainer(Mode::Lisa, 0.2, 1);
    let losses: Vec<f32> = (0..50).map(|_| t.step(&data).unwrap().loss).collect();
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[40..].iter().sum::<f32>() / 10.0;
    assert!(last < 0.9 * first, "loss did not fall: first 10 mean {first}, last 10 mean {last}");
    assert_eq!(t.run.state.step, 50);
}

#[test]
fn baseline_equals_lisa_with_zero_lambda_on_the_side_network() {
    let data = FillCircles { resolution: 16, len: 64, seed: 4 };
    let (mut a, mut b) = (trainer(Mode::Baseline, 0.2, 2), trainer(Mode::Lisa, 0.0, 2));
    for _ in 0..3 {
        let (sa, sb) = (a.step(&data).unwrap(), b.step(&data).unwrap());
        assert_eq!(sa.main_loss, sb.main_loss);
    }
    for (id, p) in a.model.store().iter() {
        let q = b.model.store().get(b.model.store().find(&p.name).unwrap());
        assert_eq!(C::to_vec(&p.value).unwrap(), C::to_vec(&q.value).unwrap(), "{} differs ({id:?})", p.name);
    }
}

#[test]
fn ema_warms_up_like_diffusers() {
    let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: false }, CpuDevice, 0).unwrap();
    let ema = lisa_trainer::optim::Ema::new(model.store(), 0.999, |n| n.starts_with("side.")).unwrap();
    assert_eq!(ema.decay_at(1), 0.0, "the first update copies the weights");
    assert!((ema.decay_at(2) - 2.0 / 11.0).abs() < 1e-7);
    assert!((ema.decay_at(101) - 101.0 / 110.0).abs() < 1e-6);
    assert_eq!(ema.decay_at(1_000_000), 0.999, "capped at the configured decay");
}

#[test]
fn gradient_checkpointing_gives_the_same_training() {
    let data = FillCircles { resolution: 16, len: 64, seed: 5 };
    for mode in [Mode::Lisa, Mode::Baseline] {
        let mut a = trainer(mode, 0.2, 3);
        let mut b = trainer(mode, 0.2, 3);
        b.config.gradient_checkpointing = true;
        for _ in 0..3 {
            let (sa, sb) = (a.step(&data).unwrap(), b.step(&data).unwrap());
            assert_eq!((sa.loss, sa.grad_norm), (sb.loss, sb.grad_norm), "{mode:?}");
        }
        for (_, p) in a.model.store().iter() {
            let q = b.model.store().get(b.model.store().find(&p.name).unwrap());
            assert_eq!(C::to_vec(&p.value).unwrap(), C::to_vec(&q.value).unwrap(), "{mode:?}: {} differs", p.name);
        }
    }
}

/// The decoder's reference: at the first step its zero-initialised output convolution makes
/// it output zeros, so its distance is exactly the zero decoder's; as it learns, it explains
/// part of τ (a distance below the zero decoder's); the baseline reports neither.
#[test]
fn lisa_distance_is_measured_against_a_zero_decoder() {
    let data = FillCircles { resolution: 16, len: 256, seed: 5 };
    let mut t = trainer(Mode::Lisa, 1.0, 3);
    let first = t.step(&data).unwrap();
    assert!(first.lisa_zero_distance > 0.0);
    assert_eq!(first.lisa_loss, first.lisa_zero_distance, "the decoder starts at zero output");
    let later: Vec<_> = (0..40).map(|_| t.step(&data).unwrap()).collect();
    let ratio: f32 = later[30..].iter().map(|s| s.lisa_loss).sum::<f32>()
        / later[30..].iter().map(|s| s.lisa_zero_distance).sum::<f32>();
    assert!(ratio < 1.0, "after 40 steps the decoder explains some of τ: distance / zero distance = {ratio}");
    let base = trainer(Mode::Baseline, 1.0, 3).step(&data).unwrap();
    assert_eq!((base.lisa_loss, base.lisa_zero_distance), (0.0, 0.0));
}

/// Sums of the side network's weights, as a validator sees them.
struct SideSums(Vec<f64>);

fn side_sum(t: &Trainer<C>) -> f64 {
    let store = t.model.store();
    let side = store.iter().filter(|(_, p)| p.name.starts_with("side."));
    side.map(|(_, p)| C::to_vec(&p.value).unwrap().iter().map(|&v| v as f64).sum::<f64>()).sum()
}

impl lisa_trainer::session::Validator<C> for SideSums {
    fn validate(&mut self, t: &Trainer<C>) -> lisa_trainer::Result<lisa_trainer::session::ValidationReport> {
        self.0.push(side_sum(t));
        Ok(Default::default())
    }
}

/// With an EMA a run validates with the averaged weights (what a user samples with), while
/// training goes on from its own: the trained weights are those of the same run without EMA,
/// and the validator saw the EMA's shadows, not them.
#[test]
fn validation_sees_the_ema_and_training_keeps_its_own_weights() {
    let data = FillCircles { resolution: 16, len: 64, seed: 3 };
    let run = |ema: Option<f32>, name: &str| {
        let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: true }, CpuDevice, 5).unwrap();
        let cfg = TrainConfig {
            seed: 5,
            batch_size: 4,
            max_train_steps: 4,
            ema_decay: ema,
            optim: OptimConfig { lr: 1e-2, ..OptimConfig::default() },
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(model, cfg).unwrap();
        let dir = std::env::temp_dir().join(format!("lisa-ema-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut seen = SideSums(Vec::new());
        let options = lisa_trainer::session::RunOptions::new(&dir, 1);
        lisa_trainer::session::run(&mut t, &data, Some(&mut seen), &options, &mut ()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (t, seen.0)
    };
    let (plain, plain_seen) = run(None, "off");
    let (ema, ema_seen) = run(Some(0.9), "on");
    let bits = |t: &Trainer<C>| -> Vec<Vec<u32>> {
        t.model
            .store()
            .iter()
            .map(|(_, p)| C::to_vec(&p.value).unwrap().iter().map(|v| v.to_bits()).collect())
            .collect()
    };
    assert_eq!(bits(&plain), bits(&ema), "the EMA changes no trained weight");
    assert_eq!(plain_seen.last(), Some(&side_sum(&plain)), "without EMA the validator sees the trained weights");
    let shadows: f64 = ema
        .optimizer
        .ema
        .as_ref()
        .unwrap()
        .shadow
        .iter()
        .map(|(_, s)| C::to_vec(s).unwrap().iter().map(|&v| v as f64).sum::<f64>())
        .sum();
    assert_eq!(ema_seen.last(), Some(&shadows), "the validator sees the EMA's weights");
    // Step 1's EMA is a copy (decay 0 at the first update); later ones lag the weights.
    assert_eq!(ema_seen[0], plain_seen[0]);
    assert_ne!(ema_seen[3], plain_seen[3]);
}
