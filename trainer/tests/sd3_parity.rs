//! Parity of lisa's SD3 transformer and SD3 ControlNet with diffusers (golden files made by
//! `scripts/goldens/diffusers_sd3.py` with diffusers 0.42.1 / torch 2.15.0): the transformer's
//! output without and with residuals, every ControlNet residual and the input of every
//! `controlnet_blocks[i]`, and torch-autograd gradients of a random projection of the
//! controlled output for 10 (SD3) and 17 (SD3.5) ControlNet tensors. Two tiny cases: SD3-like (positions cropped from a larger table, a
//! residual per 1.5 blocks, an extra condition channel) and SD3.5-like (RMS qk-norm, dual
//! attention, a residual per 2 blocks). Also: bad configs and weights are refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::sd::read_json_config;
use lisa_trainer::model::sd3::{Sd3Config, Sd3ControlNet, Sd3Inputs, Sd3Transformer, load_weights};
use lisa_trainer::params::ParamStore;
use serde_json::json;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3").join(case)
}

fn check_case<B: Backend>(case: &str, device: B::Device) {
    let dir = fixture(case);
    let (io, meta) = read(&dir.join("io.safetensors"));
    let scale: f32 = meta["conditioning_scale"].parse().unwrap();
    let tc = Sd3Config::from_transformer_json(&read_json_config(&dir.join("transformer")).unwrap()).unwrap();
    let (cc, extras) = Sd3Config::from_controlnet_json(&read_json_config(&dir.join("controlnet")).unwrap()).unwrap();
    tc.check_controlnet(&cc).unwrap();
    let mut store = ParamStore::<B>::new(device.clone(), 0).freeze_prefix("main.");
    let transformer = Sd3Transformer::new(&mut store, "main", &tc).unwrap();
    let controlnet = Sd3ControlNet::new(&mut store, "side", &cc, extras).unwrap();
    let positions = transformer.positions().to_vec();
    let n = load_weights(&mut store, "main", &dir.join("transformer"), &positions).unwrap();
    let m = load_weights(&mut store, "side", &dir.join("controlnet"), &positions).unwrap();
    assert!(n > 0 && m > 0);

    let t = |k: &str| B::from_slice(&io[k].1, &io[k].0, DType::F32, &device).unwrap();
    let tape = Tape::<B>::new();
    let p = store.bind(&tape);
    let (x, cond) = (tape.constant(t("hidden_states")), tape.constant(t("controlnet_cond")));
    let (context, pooled) = (tape.constant(t("encoder_hidden_states")), tape.constant(t("pooled_projections")));
    let timesteps = io["timestep"].1.clone();
    let inputs = Sd3Inputs { context: &context, pooled: &pooled, t: &timesteps };

    let plain = transformer.forward(&p, &x, &inputs, None).unwrap();
    assert_parity(&format!("{case} transformer_out"), &B::to_vec(&plain.value).unwrap(), &io["transformer_out"].1);
    let out = controlnet.forward(&p, &x, &cond, &inputs, scale).unwrap();
    for (i, (r, h)) in out.residuals.iter().zip(&out.hidden).enumerate() {
        assert_parity(
            &format!("{case} controlnet_block_{i}"),
            &B::to_vec(&r.value).unwrap(),
            &io[&format!("controlnet_block_{i}")].1,
        );
        assert_parity(
            &format!("{case} controlnet_hidden_{i}"),
            &B::to_vec(&h.value).unwrap(),
            &io[&format!("controlnet_hidden_{i}")].1,
        );
    }
    let controlled = transformer.forward(&p, &x, &inputs, Some(&out.residuals)).unwrap();
    assert_parity(
        &format!("{case} transformer_out_controlled"),
        &B::to_vec(&controlled.value).unwrap(),
        &io["transformer_out_controlled"].1,
    );
    // Gradients of `L = Σ w ⊙ out` through the transformer into the ControlNet, against
    // torch autograd.
    let leaves: BTreeMap<_, _> = p.leaves().into_iter().collect();
    let grads = tape.backward(&[(&controlled, t("grad_seed"))]).unwrap();
    let grad_of = |name: &str| {
        let id = store.find(&format!("side.{name}")).unwrap_or_else(|| panic!("no parameter side.{name}"));
        grads.get(leaves[&id]).map(|g| B::to_vec(g).unwrap())
    };
    let mut pinned = 0;
    for (key, (_, want)) in io.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let got = grad_of(name).unwrap_or_else(|| panic!("{case}: no gradient reached {name}"));
        assert_parity(&format!("{case} ∂L/∂{name}"), &got, want);
        pinned += 1;
    }
    assert!(pinned >= 10, "{case}: {pinned} gradients pinned");
    if case == "sd3" {
        // diffusers adds residual 0 after blocks 0 and 1 and none after the last: residual 1
        // never reaches the output, so ControlNet block 1 gets no gradient.
        let dead = grad_of("controlnet_blocks.1.weight");
        assert!(dead.is_none_or(|g| g.iter().all(|v| *v == 0.0)), "{case}: residual 1 reached the output");
    }
}

#[test]
fn sd3_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd3", lisa_cpu::CpuDevice);
}

#[test]
fn sd35_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd35", lisa_cpu::CpuDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn both_sd3_cases_match_diffusers_on_wgpu() {
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
fn bad_sd3_configs_and_weights_are_named() {
    let base = read_json_config(&fixture("sd3").join("transformer")).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = base.clone();
        edit(&mut c);
        Sd3Config::from_transformer_json(&c).expect_err("must be refused").to_string()
    };
    assert!(refused(&|c| drop(c.insert("qk_norm".into(), json!("l2")))).contains("qk_norm"));
    assert!(refused(&|c| drop(c.insert("wavelets".into(), json!(1)))).contains("unknown key wavelets"));
    assert!(
        refused(&|c| drop(c.insert("caption_projection_dim".into(), json!(12)))).contains("caption_projection_dim")
    );
    assert!(refused(&|c| drop(c.insert("dual_attention_layers".into(), json!([7])))).contains("block 7"));
    assert!(refused(&|c| drop(c.insert("num_layers".into(), json!(0)))).contains("num_layers"));
    let mut cn = read_json_config(&fixture("sd3").join("controlnet")).unwrap();
    cn.insert("use_pos_embed".into(), json!(false));
    assert!(Sd3Config::from_controlnet_json(&cn).unwrap_err().to_string().contains("use_pos_embed"));
    // A ControlNet with another width does not fit.
    let tc = Sd3Config::from_transformer_json(&base).unwrap();
    let mut other = tc.clone();
    other.pooled_projection_dim = 7;
    assert!(tc.check_controlnet(&other).unwrap_err().to_string().contains("pooled_projection_dim"));
    // A grid beyond the positions, and weights of another config, are errors naming the cause.
    assert!(tc.grid(14).unwrap_err().to_string().contains("pos_embed_max_size"));
    let mut small = tc.clone();
    small.num_attention_heads = 1;
    small.caption_projection_dim = 4;
    let mut store = ParamStore::<lisa_cpu::CpuBackend>::new(lisa_cpu::CpuDevice, 0);
    let t = Sd3Transformer::new(&mut store, "", &small).unwrap();
    let positions = t.positions().to_vec();
    let err = load_weights(&mut store, "", &fixture("sd3").join("transformer"), &positions).unwrap_err().to_string();
    assert!(err.contains("pos_embed.pos_embed"), "{err}");
}

/// diffusers' `from_transformer` (the first blocks and the embeddings copied, the condition
/// embedding and the output projections zero), and the ControlNet saved as a diffusers folder
/// and read back: the same config and bit-identical tensors (diffusers' own loader reads the
/// folder too: `scripts/goldens/load_controlnet.py FOLDER`).
#[test]
fn a_controlnet_from_the_transformer_saves_and_loads_as_diffusers_does() {
    use lisa_core::backend::prelude::*;
    use lisa_trainer::model::sd3::{Sd3ControlNetExtras, copy_transformer_into_controlnet, save_controlnet};
    type C = lisa_cpu::CpuBackend;
    let dir = fixture("sd35");
    let tc = Sd3Config::from_transformer_json(&read_json_config(&dir.join("transformer")).unwrap()).unwrap();
    assert!(tc.controlnet_from_transformer(tc.num_layers).unwrap_err().to_string().contains("last block"));
    let cc = tc.controlnet_from_transformer(3).unwrap();
    assert_eq!(cc.dual_attention_layers, vec![0, 1]);
    let extras = Sd3ControlNetExtras { extra_conditioning_channels: 1, force_zeros_for_pooled_projection: true };
    let mut store = ParamStore::<C>::new(lisa_cpu::CpuDevice, 5).freeze_prefix("main.");
    let transformer = Sd3Transformer::new(&mut store, "main", &tc).unwrap();
    Sd3ControlNet::new(&mut store, "side", &cc, extras).unwrap();
    let positions = transformer.positions().to_vec();
    load_weights(&mut store, "main", &dir.join("transformer"), &positions).unwrap();
    let copied = copy_transformer_into_controlnet(&mut store, "main", "side").unwrap();
    let value = |name: &str| C::to_vec(&store.get(store.find(name).unwrap()).value).unwrap();
    for name in [
        "transformer_blocks.1.attn2.to_q.weight",
        "transformer_blocks.2.ff.net.2.weight",
        "pos_embed.proj.bias",
        "context_embedder.weight",
    ] {
        assert_eq!(value(&format!("side.{name}")), value(&format!("main.{name}")), "{name} copied");
    }
    for name in ["side.pos_embed_input.proj.weight", "side.controlnet_blocks.2.weight"] {
        assert!(value(name).iter().all(|v| *v == 0.0), "{name} stays zero");
    }
    assert!(copied > 50, "{copied} tensors copied");

    let out = std::env::temp_dir().join(format!("lisa-sd3-controlnet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    save_controlnet(&store, "side", &cc, extras, &out).unwrap();
    let (back, back_extras) = Sd3Config::from_controlnet_json(&read_json_config(&out).unwrap()).unwrap();
    assert_eq!((back.clone(), back_extras), (cc.clone(), extras));
    let mut again = ParamStore::<C>::new(lisa_cpu::CpuDevice, 9);
    Sd3ControlNet::new(&mut again, "side", &back, back_extras).unwrap();
    load_weights(&mut again, "side", &out, &positions).unwrap();
    for (_, p) in again.iter() {
        assert_eq!(C::to_vec(&p.value).unwrap(), value(&p.name), "{} round trip", p.name);
    }
    // LISA_KEEP_SD3_CONTROLNET=1 keeps the folder, to load it with diffusers by hand.
    if std::env::var_os("LISA_KEEP_SD3_CONTROLNET").is_none() {
        std::fs::remove_dir_all(&out).unwrap();
    } else {
        eprintln!("kept {}", out.display());
    }
}

/// The memory check before a run counts the weights from the configs alone, exactly: the
/// tiny fixtures' weight files (SD3: an extra condition channel; SD3.5: dual attention and
/// RMS q/k norms) hold that many numbers, the transformer's last block without its text
/// outputs included, and at SD3-medium's and SD3.5-large's sizes it is what diffusers 0.42.1
/// makes (`scripts/goldens/diffusers_parameter_counts.py`, same configs: the parameters and
/// the stored position table).
#[test]
fn parameter_counts_match_the_weight_files_and_diffusers_at_real_size() {
    use lisa_trainer::model::sd3::Sd3ControlNetExtras;
    let numbers_in = |dir: &Path| -> u128 {
        let (tensors, _) = read(&dir.join("diffusion_pytorch_model.safetensors"));
        tensors.values().map(|(shape, _)| shape.num_elements().unwrap() as u128).sum()
    };
    for case in ["sd3", "sd35"] {
        let dir = fixture(case);
        let transformer =
            Sd3Config::from_transformer_json(&read_json_config(&dir.join("transformer")).unwrap()).unwrap();
        assert_eq!(transformer.parameter_count(None), numbers_in(&dir.join("transformer")), "{case} transformer");
        let (controlnet, extras) =
            Sd3Config::from_controlnet_json(&read_json_config(&dir.join("controlnet")).unwrap()).unwrap();
        assert_eq!(controlnet.parameter_count(Some(extras)), numbers_in(&dir.join("controlnet")), "{case} ControlNet");
        // More condition channels widen the condition's patch embedding only.
        let wider =
            Sd3ControlNetExtras { extra_conditioning_channels: extras.extra_conditioning_channels + 1, ..extras };
        let per_channel = (transformer.patch_size.pow(2) * transformer.inner_dim()) as u128;
        assert_eq!(controlnet.parameter_count(Some(wider)), controlnet.parameter_count(Some(extras)) + per_channel);
    }
    let real = |heads: usize, layers: usize, qk_norm: Option<&str>| {
        let config = json!({
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": layers,
            "attention_head_dim": 64, "num_attention_heads": heads, "joint_attention_dim": 4096,
            "caption_projection_dim": heads * 64, "pooled_projection_dim": 2048, "out_channels": 16,
            "pos_embed_max_size": 192, "qk_norm": qk_norm
        });
        let transformer = Sd3Config::from_transformer_json(config.as_object().unwrap()).unwrap();
        let controlnet = transformer.controlnet_from_transformer(12).unwrap();
        let extras = Sd3ControlNetExtras { extra_conditioning_channels: 0, force_zeros_for_pooled_projection: true };
        (transformer.parameter_count(None), controlnet.parameter_count(Some(extras)))
    };
    assert_eq!(real(24, 24, None), (2_084_951_104, 1_119_478_272), "SD3-medium");
    assert_eq!(real(38, 38, Some("rms_norm")), (8_146_280_768, 2_744_376_448), "SD3.5-large");
}
