//! Parity of lisa's Flux transformer and Flux ControlNet with diffusers (golden files made by
//! `scripts/goldens/diffusers_flux.py` with diffusers 0.42.1 / torch 2.15.0): the rotary
//! tables, the transformer's output without and with residuals, every ControlNet residual
//! (double- and single-stream) and the input of every `controlnet_blocks[i]` and
//! `controlnet_single_blocks[i]`, and torch-autograd gradients of a random projection of the
//! controlled output for ControlNet tensors. Two tiny cases: Flux-dev-like (guidance
//! embedding; 1 double and 2 single ControlNet blocks for 2 and 3, diffusers' ceil interval)
//! and union mode (no guidance, a control-type token before the text). Also: bad configs are
//! refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::flux::{
    FluxConfig, FluxControlNet, FluxInputs, FluxTransformer, ROPE_THETA, load_weights, pack, position_ids,
};
use lisa_trainer::model::sd::read_json_config;
use lisa_trainer::nn::rotary_tables;
use lisa_trainer::params::ParamStore;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux").join(case)
}

/// diffusers orders the joint sequence `[text; image]`, lisa `[image; text]`: lisa's rows of a
/// per-token table `[n + s, w]` in diffusers' order.
fn text_first(rows: &[f32], n: usize, s: usize, w: usize) -> Vec<f32> {
    [&rows[n * w..(n + s) * w], &rows[..n * w]].concat()
}

fn check_case<B: Backend>(case: &str, device: B::Device) {
    let dir = fixture(case);
    let (io, meta) = read(&dir.join("io.safetensors"));
    let scale: f32 = meta["conditioning_scale"].parse().unwrap();
    let tc = FluxConfig::from_transformer_json(&read_json_config(&dir.join("transformer")).unwrap()).unwrap();
    let (cc, extras) = FluxConfig::from_controlnet_json(&read_json_config(&dir.join("controlnet")).unwrap()).unwrap();
    tc.check_controlnet(&cc).unwrap();
    let mut store = ParamStore::<B>::new(device.clone(), 0).freeze_prefix("main.");
    let transformer = FluxTransformer::new(&mut store, "main", &tc).unwrap();
    let controlnet = FluxControlNet::new(&mut store, "side", &cc, extras).unwrap();
    let n = load_weights(&mut store, "main", &dir.join("transformer")).unwrap();
    let m = load_weights(&mut store, "side", &dir.join("controlnet")).unwrap();
    assert!(n > 0 && m > 0);

    // The rotary tables of the transformer's sequence (5 text tokens, a 4×4 grid).
    let (s, grid) = (io["txt_ids"].0.dims()[0], (4, 4));
    let (cos, sin) = rotary_tables(&position_ids(grid, s), &tc.axes_dims_rope, ROPE_THETA).unwrap();
    let w = tc.attention_head_dim;
    assert_parity(&format!("{case} rope_cos"), &text_first(&cos, 16, s, w), &io["rope_cos"].1);
    assert_parity(&format!("{case} rope_sin"), &text_first(&sin, 16, s, w), &io["rope_sin"].1);

    let t = |k: &str| B::from_slice(&io[k].1, &io[k].0, DType::F32, &device).unwrap();
    let tape = Tape::<B>::new();
    let p = store.bind(&tape);
    let (x, cond) = (tape.constant(t("latents")), tape.constant(t("control_latents")));
    let (context, pooled) = (tape.constant(t("encoder_hidden_states")), tape.constant(t("pooled_projections")));
    let timesteps: Vec<f32> = io["timestep"].1.iter().map(|v| v * 1000.0).collect();
    let guidance: Option<Vec<f32>> = io.get("guidance").map(|g| g.1.iter().map(|v| v * 1000.0).collect());
    let inputs = FluxInputs { context: &context, pooled: &pooled, t: &timesteps, guidance: guidance.as_deref() };
    let mode: Option<Vec<usize>> = io.get("controlnet_mode").map(|m| m.1.iter().map(|v| *v as usize).collect());

    let plain = transformer.forward(&p, &x, &inputs, None).unwrap();
    assert_parity(
        &format!("{case} transformer_out"),
        &B::to_vec(&plain.value).unwrap(),
        &io["transformer_out_unpacked"].1,
    );
    let out = controlnet.forward(&p, &x, &cond, &inputs, mode.as_deref(), scale).unwrap();
    let pairs = [
        ("controlnet_block", "controlnet_hidden", &out.residuals.blocks, &out.hidden),
        ("controlnet_single_block", "controlnet_single_hidden", &out.residuals.single, &out.single_hidden),
    ];
    for (residual, hidden, residuals, features) in pairs {
        assert!(!residuals.is_empty());
        for (i, (r, h)) in residuals.iter().zip(features.iter()).enumerate() {
            let (rk, hk) = (format!("{residual}_{i}"), format!("{hidden}_{i}"));
            assert_parity(&format!("{case} {rk}"), &B::to_vec(&r.value).unwrap(), &io[&rk].1);
            assert_parity(&format!("{case} {hk}"), &B::to_vec(&h.value).unwrap(), &io[&hk].1);
        }
    }
    let controlled = transformer.forward(&p, &x, &inputs, Some(&out.residuals)).unwrap();
    let packed = B::to_vec(&pack(&tape, &controlled).unwrap().value).unwrap();
    assert_parity(&format!("{case} transformer_out_controlled"), &packed, &io["transformer_out_controlled"].1);

    // Gradients of `L = Σ w ⊙ out` through the transformer into the ControlNet, against
    // torch autograd.
    let leaves: BTreeMap<_, _> = p.leaves().into_iter().collect();
    let grads = tape.backward(&[(&controlled, t("grad_seed"))]).unwrap();
    let mut pinned = 0;
    for (key, (_, want)) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let id = store.find(&format!("side.{name}")).unwrap_or_else(|| panic!("no parameter side.{name}"));
        let got = grads.get(leaves[&id]).map(|g| B::to_vec(g).unwrap());
        let got = got.unwrap_or_else(|| panic!("{case}: no gradient reached {name}"));
        assert_parity(&format!("{case} ∂L/∂{name}"), &got, want);
        pinned += 1;
    }
    assert!(pinned >= 10, "{case}: {pinned} gradients pinned");
}

#[test]
fn flux_dev_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("dev", lisa_cpu::CpuDevice);
}

#[test]
fn flux_union_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("union", lisa_cpu::CpuDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn both_flux_cases_match_diffusers_on_wgpu() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    let device = lisa_cubecl::WgpuBackend::probe().unwrap();
    for case in ["dev", "union"] {
        check_case::<lisa_cubecl::WgpuBackend>(case, device.clone());
    }
}
