//! Samplers: shapes, determinism, control scale 0 = the main model alone, bad combinations.

mod common;

use common::tiny_model;
use lisa_core::Prediction;
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::sample::{SampleConfig, Sampler, sample};
use lisa_trainer::scheduler::{NoiseConfig, Spacing};

fn randn(shape: &[usize], seed: u64) -> lisa_cpu::CpuTensor {
    C::random_normal(&Shape::new(shape), seed, DType::F32, &CpuDevice).unwrap()
}

#[test]
fn diffusion_samplers_are_deterministic_and_control_scale_zero_ignores_the_hint() {
    let mut model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: false }, CpuDevice, 3).unwrap();
    let zero_ids: Vec<_> = model
        .store()
        .iter()
        .filter(|(_, p)| p.name.contains("zero") || p.name.starts_with("side.hint.2"))
        .map(|(id, _)| id)
        .collect();
    for id in zero_ids {
        let s = C::shape(&model.store().get(id).value);
        model.store_mut().get_mut(id).value = C::scale(&randn(s.dims(), 4), 0.2).unwrap();
    }
    let noise = NoiseConfig::default();
    let prompts = ["red circle with blue background", "green circle with yellow background"];
    let (h1, h2) = (randn(&[2, 1, 16, 16], 5), randn(&[2, 1, 16, 16], 6));
    let spacings = [None, Some(Spacing::Trailing), Some(Spacing::Linspace)];
    for (sampler, spacing) in
        [Sampler::Ddim { eta: 0.0 }, Sampler::Ddim { eta: 0.5 }, Sampler::Ddpm].into_iter().zip(spacings)
    {
        let cfg = SampleConfig { sampler, spacing, steps: 5, guidance_scale: 2.0, seed: 9, ..SampleConfig::default() };
        let a = sample(model.as_ref(), &noise, &h1, &prompts, &cfg).unwrap();
        assert_eq!(C::shape(&a).dims(), &[2, 3, 16, 16]);
        assert!(C::to_vec(&a).unwrap().iter().all(|v| v.is_finite()));
        assert_eq!(
            C::to_vec(&a).unwrap(),
            C::to_vec(&sample(model.as_ref(), &noise, &h1, &prompts, &cfg).unwrap()).unwrap(),
            "same seed, same images"
        );
        assert_ne!(
            C::to_vec(&a).unwrap(),
            C::to_vec(&sample(model.as_ref(), &noise, &h2, &prompts, &cfg).unwrap()).unwrap(),
            "the hint matters"
        );
        let off = SampleConfig { control_scale: 0.0, ..cfg.clone() };
        assert_eq!(
            C::to_vec(&sample(model.as_ref(), &noise, &h1, &prompts, &off).unwrap()).unwrap(),
            C::to_vec(&sample(model.as_ref(), &noise, &h2, &prompts, &off).unwrap()).unwrap(),
            "control scale 0: the main model alone"
        );
    }
}

#[test]
fn euler_on_a_flow_model_and_mismatches_rejected() {
    let mut cfg = tiny_model();
    cfg.config["unet"]["prediction"] = serde_json::to_value(Prediction::FlowVelocity).unwrap();
    let model = registry::build::<C>(&cfg, Parts::Dual { decoder: false }, CpuDevice, 3).unwrap();
    let hint = randn(&[1, 1, 16, 16], 7);
    let flow = NoiseConfig::sd3();
    let euler = SampleConfig { sampler: Sampler::Euler, steps: 4, ..SampleConfig::default() };
    let x = sample(model.as_ref(), &flow, &hint, &["red circle with blue background"], &euler).unwrap();
    assert!(C::to_vec(&x).unwrap().iter().all(|v| v.is_finite()));
    assert!(
        sample(model.as_ref(), &NoiseConfig::default(), &hint, &["red circle with blue background"], &euler).is_err(),
        "Euler needs a flow"
    );
    let ddim = SampleConfig::default();
    assert!(
        sample(model.as_ref(), &flow, &hint, &["red circle with blue background"], &ddim).is_err(),
        "DDIM needs a diffusion"
    );
    let bad_eta = SampleConfig { sampler: Sampler::Ddim { eta: 2.0 }, ..SampleConfig::default() };
    assert!(
        sample(model.as_ref(), &NoiseConfig::default(), &hint, &["red circle with blue background"], &bad_eta).is_err()
    );
    let spaced = SampleConfig { spacing: Some(Spacing::Trailing), ..euler.clone() };
    assert!(
        sample(model.as_ref(), &flow, &hint, &["red circle with blue background"], &spaced).is_err(),
        "spacing on a flow"
    );
    let zero_steps = SampleConfig { steps: 0, ..SampleConfig::default() };
    assert!(
        sample(model.as_ref(), &NoiseConfig::default(), &hint, &["red circle with blue background"], &zero_steps)
            .is_err()
    );
}
