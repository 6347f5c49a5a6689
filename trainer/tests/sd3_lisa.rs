//! LISA on SD3 against torch (golden files `tests/fixtures/sd3/<case>/lisa.safetensors` made by
//! `scripts/goldens/diffusers_sd3.py` with diffusers 0.42.1 / torch 2.15.0): the `sd3`
//! architecture's training forward (the hooked ControlNet tokens `block_i`, the token decoder
//! back to latent patches, the prior from the same transformer without residuals, the
//! velocity-space LISA target), both losses and torch-autograd gradients of
//! `mse(controlled, v) + λ·mse(D(h, t), stopgrad(v − prior))` for ControlNet and decoder
//! tensors. Also: the hooks and the prompt tables an sd3 model accepts.

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, golden_decoder, load_golden_decoder, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::sd::read_json_config;
use lisa_trainer::model::sd3::Sd3Model;
use lisa_trainer::model::{
    Conditioning, DualDenoiser, ForwardOptions, ModelSpec, Parts, PromptEmbedding, forward_train, registry,
};
use serde_json::json;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3").join(case)
}

/// The case's model spec, the ControlNet's config given (`from_transformer` otherwise).
fn spec(case: &str, hook: &str) -> ModelSpec {
    let dir = fixture(case);
    let (_, meta) = read(&dir.join("lisa.safetensors"));
    let decoder = golden_decoder(hook, &meta);
    let mut config = serde_json::Map::new();
    config.insert("transformer".into(), read_json_config(&dir.join("transformer")).unwrap().into());
    config.insert("controlnet".into(), read_json_config(&dir.join("controlnet")).unwrap().into());
    config.insert("conditioning_scale".into(), json!(meta["conditioning_scale"].parse::<f32>().unwrap()));
    ModelSpec { architecture: "sd3".into(), decoder, config }
}

fn check_case<B: Backend>(case: &str, device: B::Device) {
    let dir = fixture(case);
    let (io, _) = read(&dir.join("io.safetensors"));
    let (lisa, meta) = read(&dir.join("lisa.safetensors"));
    let mut model =
        registry::build::<B>(&spec(case, &meta["hook"]), Parts::Dual { decoder: true }, device.clone(), 0).unwrap();
    assert!(model.load_main(&dir.join("transformer")).unwrap() > 0);
    assert!(model.load_side(&dir.join("controlnet")).unwrap() > 0);
    assert_eq!(load_golden_decoder(model.as_mut(), &dir.join("lisa.safetensors"), &lisa), 6);

    let tensor = |k: &str| {
        let (shape, values) = io.get(k).or_else(|| lisa.get(k)).unwrap_or_else(|| panic!("no golden {k}"));
        B::from_slice(values, shape, DType::F32, &device).unwrap()
    };
    let (ehs, pooled) = (&io["encoder_hidden_states"], &io["pooled_projections"]);
    let cond = Conditioning {
        t: io["timestep"].1.clone(),
        prompt: PromptEmbedding::TextPooled {
            values: ehs.1.clone(),
            tokens: ehs.0.dims()[1],
            dim: ehs.0.dims()[2],
            pooled: pooled.1.clone(),
            pooled_dim: pooled.0.dims()[1],
        },
    };
    let tape = Tape::<B>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(tensor("hidden_states")), tape.constant(tensor("controlnet_cond")));
    let out = forward_train(model.as_ref(), &bound, &x, &hint, &cond, ForwardOptions::lisa(true)).unwrap();
    let v = |t: &B::Tensor| B::to_vec(t).unwrap();
    assert_parity(&format!("{case} prior"), &v(out.prior.as_ref().unwrap()), &io["transformer_out"].1);
    assert_parity(&format!("{case} controlled"), &v(&out.pred.value), &io["transformer_out_controlled"].1);
    let leaves = bound.leaves();
    let checked = common::golden::assert_lisa_matches(case, model.as_ref(), &tape, &leaves, &out, &lisa, &meta);
    assert_eq!(checked, 11, "{case}: gradients checked");
}

#[test]
fn sd3_lisa_matches_torch_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd3", lisa_cpu::CpuDevice);
}

#[test]
fn sd35_lisa_matches_torch_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd35", lisa_cpu::CpuDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn sd3_lisa_matches_torch_on_wgpu() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    let device = lisa_cubecl::WgpuBackend::probe().unwrap();
    for case in ["sd3", "sd35"] {
        check_case::<lisa_cubecl::WgpuBackend>(case, device.clone());
    }
}

#[test]
fn sd3_hooks_and_controlnet_settings_are_checked_before_building() {
    type C = lisa_cpu::CpuBackend;
    let build = |spec: &ModelSpec| {
        registry::validate(spec)?;
        Sd3Model::<C>::new(spec, Parts::Dual { decoder: true }, lisa_cpu::CpuDevice, 0).map(|_| ())
    };
    let err = |spec: ModelSpec| build(&spec).unwrap_err().to_string();
    // The fixture's ControlNet has blocks 0 and 1.
    assert!(err(spec("sd3", "block_2")).contains("block_0..block_1"));
    assert!(err(spec("sd3", "down_1")).contains("block_0..block_1"));
    assert!(err(spec("sd3", "mid")).contains("does not exist"));
    build(&spec("sd3", "block_1")).unwrap();

    // From the transformer: the layers default to diffusers' 12, too many for 3 blocks.
    let mut s = spec("sd3", "block_0");
    s.config.remove("controlnet");
    assert!(err(s.clone()).contains("1..=2"), "{}", err(s.clone()));
    s.config.insert("controlnet_layers".into(), json!(2));
    s.config.insert("extra_conditioning_channels".into(), json!(1));
    let model = Sd3Model::<C>::new(&s, Parts::Dual { decoder: true }, lisa_cpu::CpuDevice, 0).unwrap();
    assert_eq!(DualDenoiser::hint_shape(&model), [5, 8, 8]);
    assert_eq!(DualDenoiser::sample_shape(&model), [4, 8, 8]);
    // A ControlNet config and the from-transformer settings together are refused.
    let mut both = spec("sd3", "block_0");
    both.config.insert("controlnet_layers".into(), json!(2));
    assert!(err(both).contains("controlnet_layers"));
    // Unknown keys are named.
    let mut unknown = spec("sd3", "block_0");
    unknown.config.insert("unet".into(), json!({}));
    assert!(err(unknown).contains("unet"));
    // Prompt embeddings: none given is an error naming both keys.
    let model =
        Sd3Model::<C>::new(&spec("sd3", "block_0"), Parts::Dual { decoder: false }, lisa_cpu::CpuDevice, 0).unwrap();
    let e = model.embed_prompts(&["a"]).unwrap_err().to_string();
    assert!(e.contains("text_embeddings") && e.contains("pooled_text_embeddings"), "{e}");
}
