//! Parity with diffusers (golden files made by `scripts/goldens/diffusers_sd.py` with
//! diffusers 0.42.1 / torch 2.15.0): the SD UNet, every ControlNet residual, the UNet with
//! residuals, the LISA hook, decoder and target, the losses, and torch-autograd gradients of
//! the LISA loss with respect to ControlNet and decoder tensors. Four tiny layouts: SD 1.5-like
//! (conv projections, one head count), SD 2.1-like (linear projections, heads per block),
//! SDXL's deeper spatial transformers (`transformer_layers_per_block = [1, 2, 3]`) and SDXL's
//! whole layout (`addition_embed_type = "text_time"`: pooled text and six time ids).

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::sd::{SdModel, read_json_config};
use lisa_trainer::model::{
    Conditioning, DualDenoiser, ForwardOptions, ModelSpec, Parts, PromptEmbedding, forward_train,
};
use lisa_trainer::weights::load_tensors;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd").join(case)
}

fn build<B: Backend>(case: &str, device: B::Device) -> SdModel<B> {
    let dir = fixture(case);
    let (_, meta) = read(&dir.join("io.safetensors"));
    let decoder = common::golden::golden_decoder(&meta["hook"], &meta);
    let mut config = serde_json::Map::new();
    config.insert("unet".into(), read_json_config(&dir.join("unet")).unwrap().into());
    config.insert("controlnet".into(), read_json_config(&dir.join("controlnet")).unwrap().into());
    config.insert("conditioning_scale".into(), serde_json::json!(meta["conditioning_scale"].parse::<f32>().unwrap()));
    if let Some(ids) = meta.get("time_ids") {
        config.insert("add_time_ids".into(), serde_json::from_str(ids).unwrap());
    }
    let spec = ModelSpec { architecture: "sd".into(), decoder, config };
    let mut model = SdModel::<B>::new(&spec, Parts::Dual { decoder: true }, device, 0).unwrap();
    // Every tensor of diffusers' files is loaded (496 and 260 for the SD layouts).
    let tensors = |part: &str| read(&dir.join(part).join("diffusion_pytorch_model.safetensors")).0.len();
    assert_eq!(model.load_main(&dir.join("unet")).unwrap(), tensors("unet"));
    assert_eq!(model.load_controlnet(&dir.join("controlnet")).unwrap(), tensors("controlnet"));
    let path = dir.join("lisa_decoder.safetensors");
    let (dec, _) = read(&path);
    let dec = dec.into_iter().map(|(k, v)| (format!("lisa.{k}"), v)).collect();
    load_tensors(model.store_mut(), &path, dec, |n| n.starts_with("lisa."), |_| false).unwrap();
    model
}

fn check_case<B: Backend>(case: &str, device: B::Device) {
    let model = build::<B>(case, device.clone());
    let (io, meta) = read(&fixture(case).join("io.safetensors"));
    let tensor = |k: &str| B::from_slice(&io[k].1, &io[k].0, DType::F32, &device).unwrap();
    let host = |k: &str| io[k].1.clone();
    let ehs = &io["encoder_hidden_states"];
    let (values, tokens, dim) = (ehs.1.clone(), ehs.0.dims()[1], ehs.0.dims()[2]);
    let prompt = match io.get("text_embeds") {
        // SDXL: the time ids are the model's (add_time_ids), the same for every sample.
        Some((shape, pooled)) => {
            assert!(host("time_ids").chunks(6).all(|ids| ids == model.add_time_ids().unwrap()));
            PromptEmbedding::TextPooled { values, tokens, dim, pooled: pooled.clone(), pooled_dim: shape.dims()[1] }
        }
        None => PromptEmbedding::Text { values, tokens, dim },
    };
    let cond = Conditioning { t: host("timestep"), prompt };
    let scale: f32 = meta["conditioning_scale"].parse().unwrap();

    let tape = Tape::<B>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(tensor("sample")), tape.constant(tensor("controlnet_cond")));

    // Every residual, as diffusers' ControlNet returns it (× conditioning_scale).
    let side = tape.no_grad(|| model.side(&bound, &x, &hint, &cond)).unwrap();
    for (i, r) in side.residuals.down.iter().enumerate() {
        let got: Vec<f32> = B::to_vec(&r.value).unwrap().iter().map(|v| v * scale).collect();
        assert_parity(&format!("{case} controlnet_down.{i}"), &got, &host(&format!("controlnet_down.{i}")));
    }
    let mid: Vec<f32> = B::to_vec(&side.residuals.mid().unwrap().value).unwrap().iter().map(|v| v * scale).collect();
    assert_parity(&format!("{case} controlnet_mid"), &mid, &host("controlnet_mid"));

    // The training forward: controlled prediction, hook, decoder, prior.
    let out = forward_train(&model, &bound, &x, &hint, &cond, ForwardOptions::lisa(true)).unwrap();
    let v = |t: &B::Tensor| B::to_vec(t).unwrap();
    assert_parity(&format!("{case} unet_out (prior)"), &v(out.prior.as_ref().unwrap()), &host("unet_out"));
    assert_parity(&format!("{case} unet_out_with_residuals"), &v(&out.pred.value), &host("unet_out_with_residuals"));
    assert_parity(&format!("{case} hook_feature"), &v(&out.hooked.as_ref().unwrap().value), &host("hook_feature"));
    let decoded = out.decoded.as_ref().unwrap();
    assert_parity(&format!("{case} lisa_decoded"), &v(&decoded.value), &host("lisa_decoded"));
    let target = B::sub(&tensor("noise"), out.prior.as_ref().unwrap()).unwrap();
    assert_parity(&format!("{case} lisa_target"), &v(&target), &host("lisa_target"));

    // loss = mse(pred, noise) + λ·mse(decoded, noise − prior), and its gradients.
    let lambda: f32 = meta["lisa_lambda"].parse().unwrap();
    let (l_diff, g_pred) = B::mse_loss(&out.pred.value, &tensor("noise")).unwrap();
    let (l_lisa, g_dec) = B::mse_loss(&decoded.value, &target).unwrap();
    assert_parity(&format!("{case} loss_diffusion"), &[l_diff], &host("loss_diffusion"));
    assert_parity(&format!("{case} loss_lisa"), &[l_lisa], &host("loss_lisa"));
    assert_parity(&format!("{case} loss"), &[l_diff + lambda * l_lisa], &host("loss"));
    let leaves = bound.leaves();
    let grads = tape.backward(&[(&out.pred, g_pred), (decoded, B::scale(&g_dec, lambda).unwrap())]).unwrap();
    let mut checked = 0;
    for (key, (_, want)) in &io {
        let Some(name) = key.strip_prefix("grad.") else { continue };
        let name = name.replacen("controlnet.", "side.", 1);
        let id = model.store().find(&name).unwrap_or_else(|| panic!("{case}: no parameter {name}"));
        let var = leaves.iter().find(|(p, _)| *p == id).map(|(_, v)| *v).unwrap();
        let got = B::to_vec(grads.get(var).unwrap_or_else(|| panic!("{case}: no gradient reached {name}"))).unwrap();
        assert_parity(&format!("{case} {key}"), &got, want);
        checked += 1;
    }
    // 9 ControlNet and 3 decoder tensors; SDXL's deeper transformers add a second and a third
    // transformer block's; SDXL's layout has no attention at level 0 (one fewer) and adds
    // add_embedding's two and a deeper block's.
    let expected = match case {
        "sdxl_layers" => 14,
        "sdxl" => 14,
        _ => 12,
    };
    assert_eq!(checked, expected, "{case}: gradients checked");
}

#[test]
fn sd15_layout_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd15", Default::default());
}

#[test]
fn sd21_layout_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sd21", Default::default());
}

#[test]
fn sdxl_transformer_depths_match_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sdxl_layers", Default::default());
}

#[test]
fn sdxl_layout_with_text_time_matches_diffusers_on_cpu() {
    check_case::<lisa_cpu::CpuBackend>("sdxl", Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn every_layout_matches_diffusers_on_wgpu() {
    let device = lisa_cubecl::WgpuBackend::probe().unwrap();
    check_case::<lisa_cubecl::WgpuBackend>("sd15", device.clone());
    check_case::<lisa_cubecl::WgpuBackend>("sd21", device.clone());
    check_case::<lisa_cubecl::WgpuBackend>("sdxl_layers", device.clone());
    check_case::<lisa_cubecl::WgpuBackend>("sdxl", device);
}
