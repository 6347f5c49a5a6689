//! Structural properties of the dual-branch model (docs/method.md §1, §5).

use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::{
    Conditioning, ForwardOptions, HookLayer, ModelSpec, Parts, PromptEmbedding, forward_prior, forward_train, predict,
    registry,
};

fn randn(shape: &[usize], seed: u64) -> lisa_cpu::CpuTensor {
    C::random_normal(&Shape::new(shape), seed, DType::F32, &CpuDevice).unwrap()
}

fn cond(n: usize) -> Conditioning {
    Conditioning {
        t: (0..n).map(|i| (i * 331 % 1000) as f32).collect(),
        prompt: PromptEmbedding::Classes(vec![(0..n).map(|i| i % 9).collect(), (0..n).map(|i| (i + 3) % 9).collect()]),
    }
}

#[test]
fn reference_configuration_sizes() {
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    let main: usize = model
        .store()
        .iter()
        .filter(|(_, p)| p.name.starts_with("main."))
        .map(|(_, p)| C::shape(&p.value).num_elements().unwrap())
        .sum();
    // The reference toy UNet is "about 0.70M parameters".
    assert!((680_000..720_000).contains(&main), "main UNet has {main} parameters");
    let decoder: usize = model
        .store()
        .iter()
        .filter(|(_, p)| p.name.starts_with("lisa."))
        .map(|(_, p)| C::shape(&p.value).num_elements().unwrap())
        .sum();
    let side = model.store().count(true) - decoder;
    // ≈ 10 % here (the 256-wide time projection dominates at this size; ≈ 0.1 % on SD).
    assert!(decoder * 100 < side * 12, "decoder ({decoder}) must be small next to the side network ({side})");
    assert!(model.store().iter().all(|(_, p)| p.trainable != p.name.starts_with("main.")), "exactly main is frozen");
}

#[test]
fn side_starts_as_a_copy_and_step_zero_equals_main() {
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 1).unwrap();
    for (_, p) in
        model.store().iter().filter(|(_, p)| p.name.starts_with("main.encoder.") || p.name.starts_with("main.time."))
    {
        let side = model.store().find(&p.name.replacen("main.", "side.", 1)).expect("side copy");
        assert_eq!(C::to_vec(&model.store().get(side).value).unwrap(), C::to_vec(&p.value).unwrap(), "{}", p.name);
    }
    let tape = Tape::<C>::new();
    let b = model.store().bind(&tape);
    let x = tape.constant(randn(&[2, 3, 32, 32], 2));
    let hint = tape.constant(randn(&[2, 1, 32, 32], 3));
    let c = cond(2);
    let controlled = tape.no_grad(|| predict(model.as_ref(), &b, &x, &hint, &c, 1.0)).unwrap();
    let main = tape.no_grad(|| forward_prior(model.as_ref(), &b, &x, &c)).unwrap();
    assert_eq!(
        C::to_vec(&controlled.value).unwrap(),
        C::to_vec(&main.value).unwrap(),
        "zero convs: controlled == main at step 0"
    );
    let out = forward_train(model.as_ref(), &b, &x, &hint, &c, ForwardOptions::lisa(true)).unwrap();
    assert!(
        C::to_vec(&out.decoded.unwrap().value).unwrap().iter().all(|&v| v == 0.0),
        "zero-initialised decoder output"
    );
}

#[test]
fn reused_encoder_prior_equals_full_main_forward() {
    let mut model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 4).unwrap();
    // Non-zero residuals, so that the controlled prediction differs from the prior.
    let zero_ids: Vec<_> = model.store().iter().filter(|(_, p)| p.name.contains("zero")).map(|(id, _)| id).collect();
    for id in zero_ids {
        let s = C::shape(&model.store().get(id).value);
        model.store_mut().get_mut(id).value = C::scale(&randn(s.dims(), 9), 0.1).unwrap();
    }
    let tape = Tape::<C>::new();
    let b = model.store().bind(&tape);
    let x = tape.constant(randn(&[3, 3, 32, 32], 5));
    let hint = tape.constant(randn(&[3, 1, 32, 32], 6));
    let c = cond(3);
    let out = forward_train(model.as_ref(), &b, &x, &hint, &c, ForwardOptions::lisa(true)).unwrap();
    let full = tape.no_grad(|| forward_prior(model.as_ref(), &b, &x, &c)).unwrap();
    assert_eq!(C::to_vec(out.prior.as_ref().unwrap()).unwrap(), C::to_vec(&full.value).unwrap());
    assert_ne!(C::to_vec(&out.pred.value).unwrap(), C::to_vec(&full.value).unwrap(), "residuals change the prediction");
}

#[test]
fn every_hook_layer_builds_and_unknown_ones_are_rejected() {
    for hook in ["down_0", "down_1", "down_2", "mid"] {
        let mut c = ModelSpec::default();
        c.decoder.hook = Some(hook.parse().unwrap());
        let model = registry::build::<C>(&c, Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
        let tape = Tape::<C>::new();
        let b = model.store().bind(&tape);
        let out = forward_train(
            model.as_ref(),
            &b,
            &tape.constant(randn(&[1, 3, 32, 32], 1)),
            &tape.constant(randn(&[1, 1, 32, 32], 2)),
            &cond(1),
            ForwardOptions::lisa(true),
        )
        .unwrap();
        assert_eq!(C::shape(&out.decoded.unwrap().value).dims(), &[1, 3, 32, 32], "{hook}");
    }
    assert!("down_x".parse::<HookLayer>().is_err());
    assert!("up_1".parse::<HookLayer>().is_err());
    let mut c = ModelSpec::default();
    c.decoder.hook = Some(HookLayer::Down(7));
    let err =
        registry::build::<C>(&c, Parts::Dual { decoder: true }, CpuDevice, 0).err().expect("down_7 must be rejected");
    assert!(err.to_string().contains("down_7"), "{err}");
}

#[test]
fn frozen_main_records_nothing_and_backward_releases_the_tape() {
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: false }, CpuDevice, 2).unwrap();
    let tape = Tape::<C>::new();
    let b = model.store().bind(&tape);
    let x = tape.constant(randn(&[2, 3, 32, 32], 1));
    let main = forward_prior(model.as_ref(), &b, &x, &cond(2)).unwrap();
    assert!(!main.requires_grad(), "the frozen main network alone records no graph");
    let out = forward_train(
        model.as_ref(),
        &b,
        &x,
        &tape.constant(randn(&[2, 1, 32, 32], 2)),
        &cond(2),
        ForwardOptions::lisa(false),
    )
    .unwrap();
    assert!(tape.live_nodes() > 0);
    let g = C::full(&C::shape(&out.pred.value), 1.0, DType::F32, &CpuDevice).unwrap();
    tape.backward(&[(&out.pred, g)]).unwrap();
    assert_eq!(tape.live_nodes(), 0, "every node is released after backward");
}

#[test]
fn lisa_sub_batch_is_the_first_samples_of_the_full_batch() {
    let mut model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 8).unwrap();
    let ids: Vec<_> = model
        .store()
        .iter()
        .filter(|(_, p)| p.name.starts_with("lisa.conv_out") || p.name.contains("zero"))
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        let s = C::shape(&model.store().get(id).value);
        model.store_mut().get_mut(id).value = C::scale(&randn(s.dims(), 3), 0.1).unwrap();
    }
    let tape = Tape::<C>::new();
    let b = model.store().bind(&tape);
    let x = tape.constant(randn(&[4, 3, 32, 32], 5));
    let hint = tape.constant(randn(&[4, 1, 32, 32], 6));
    let c = cond(4);
    let full = forward_train(model.as_ref(), &b, &x, &hint, &c, ForwardOptions::lisa(true)).unwrap();
    let part = forward_train(
        model.as_ref(),
        &b,
        &x,
        &hint,
        &c,
        ForwardOptions { lisa_samples: Some(2), ..ForwardOptions::lisa(true) },
    )
    .unwrap();
    let first_half = |v: Vec<f32>| v[..v.len() / 2].to_vec();
    assert_eq!(
        C::to_vec(part.prior.as_ref().unwrap()).unwrap(),
        first_half(C::to_vec(full.prior.as_ref().unwrap()).unwrap())
    );
    assert_eq!(
        C::to_vec(&part.decoded.unwrap().value).unwrap(),
        first_half(C::to_vec(&full.decoded.unwrap().value).unwrap())
    );
    assert!(
        forward_train(
            model.as_ref(),
            &b,
            &x,
            &hint,
            &c,
            ForwardOptions { lisa_samples: Some(5), ..ForwardOptions::lisa(true) }
        )
        .is_err(),
        "more LISA samples than the batch"
    );
}

/// Each registered architecture's default hook is what a model built without a chosen hook
/// reads, and what its spec (as checkpoints record it) names; a chosen hook wins.
#[test]
fn the_registry_rows_carry_each_architectures_default_hook() {
    let names: Vec<&str> = registry::ARCHITECTURES.iter().map(|a| a.name).collect();
    assert_eq!(names, ["toy", "sd", "sd3", "flux"]);
    let toy = registry::architecture("toy").unwrap();
    let model = registry::build::<C>(&ModelSpec::default(), Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    assert_eq!(model.lisa_hook(), Some(toy.default_hook));
    assert_eq!(model.spec().decoder.hook, Some(toy.default_hook), "the spec records the hook it resolved");
    assert_eq!(registry::architecture("sd").unwrap().default_hook, HookLayer::Down(5), "the LISA authors' hook");
    assert_eq!(registry::architecture("sd3").unwrap().default_hook, HookLayer::Block(0));
    assert_eq!(registry::architecture("flux").unwrap().default_hook, HookLayer::Block(0));
    let mut chosen = ModelSpec::default();
    chosen.decoder.hook = Some(HookLayer::Mid);
    assert_eq!(chosen.hook().unwrap(), HookLayer::Mid);
    let model = registry::build::<C>(&chosen, Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    assert_eq!(model.lisa_hook(), Some(HookLayer::Mid));
    let unknown = ModelSpec { architecture: "nope".into(), ..ModelSpec::default() };
    let err = registry::build::<C>(&unknown, Parts::Prior, CpuDevice, 0).err().unwrap().to_string();
    assert!(err.contains("unknown model architecture") && err.contains("toy, sd, sd3, flux"), "{err}");
}
