//! The sd architecture's loading and saving: diffusers folders in f32, f16, bf16 and
//! sharded form, the ControlNet folder round trip, and bad input (unsupported config keys
//! and block types, missing, extra, misshapen tensors, truncated files, a ControlNet that
//! does not fit its UNet), each a clear error naming the culprit, with nothing changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::CpuBackend as C;
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::sd::{SdModel, read_diffusers_weights, read_json_config};
use lisa_trainer::model::{Conditioning, DualDenoiser, ModelSpec, Parts, PromptEmbedding, registry};
use lisa_trainer::weights::write_atomic;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd").join(case)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-sd-model-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spec(unet: serde_json::Map<String, Value>, controlnet: Option<serde_json::Map<String, Value>>) -> ModelSpec {
    let mut config = serde_json::Map::new();
    config.insert("unet".into(), unet.into());
    if let Some(c) = controlnet {
        config.insert("controlnet".into(), c.into());
    }
    ModelSpec { architecture: "sd".into(), decoder: Default::default(), config }
}

fn unet_config() -> serde_json::Map<String, Value> {
    read_json_config(&fixture("sd15/unet")).unwrap()
}

fn config_error(unet: serde_json::Map<String, Value>, controlnet: Option<serde_json::Map<String, Value>>) -> String {
    let s = spec(unet, controlnet);
    let err = registry::validate(&s).expect_err("config must be refused");
    assert!(SdModel::<C>::new(&s, Parts::Prior, Default::default(), 0).is_err());
    err.to_string()
}

#[test]
fn unsupported_config_keys_and_block_types_are_named() {
    let mut c = unet_config();
    c.insert("class_embed_type".into(), json!("timestep"));
    assert!(config_error(c, None).contains("class_embed_type"));
    let mut c = unet_config();
    c.insert("wavelet_mode".into(), json!(true));
    assert!(config_error(c, None).contains("unknown key wavelet_mode"));
    let mut c = unet_config();
    c.insert("down_block_types".into(), json!(["CrossAttnDownBlock2D", "SimpleDownBlock2D", "DownBlock2D"]));
    assert!(config_error(c, None).contains("down_block_types"));
    let mut c = unet_config();
    c.insert("attention_head_dim".into(), json!([1, 2]));
    assert!(config_error(c, None).contains("attention_head_dim has 2 entries for 3 blocks"));
    let mut c = unet_config();
    c.insert("norm_num_groups".into(), json!(5));
    assert!(config_error(c, None).contains("norm_num_groups"));
    // Keys at their default and metadata keys are fine.
    let mut c = unet_config();
    c.insert("only_cross_attention".into(), json!(false));
    c.insert("_name_or_path".into(), json!("somewhere"));
    registry::validate(&spec(c, None)).unwrap();
}

#[test]
fn a_controlnet_that_does_not_fit_the_unet_is_refused() {
    let mut cn = read_json_config(&fixture("sd15/controlnet")).unwrap();
    cn.insert("cross_attention_dim".into(), json!(16));
    let err = config_error(unet_config(), Some(cn));
    assert!(err.contains("does not fit the UNet") && err.contains("cross_attention_dim"), "{err}");
    // sd21's ControlNet (linear projections, other heads) on sd15's UNet.
    let err = config_error(unet_config(), Some(read_json_config(&fixture("sd21/controlnet")).unwrap()));
    assert!(err.contains("use_linear_projection"), "{err}");
}

/// Writes `tensors` (name → (shape, values)) as safetensors with `dtype`.
fn write_weights(path: &Path, tensors: &BTreeMap<String, (Shape, Vec<f32>)>, dtype: Dtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, v))| {
            let b: Vec<u8> = match dtype {
                Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
                _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (n.clone(), s.dims().to_vec(), b)
        })
        .collect();
    let views: Vec<(&str, TensorView)> =
        bytes.iter().map(|(n, s, b)| (n.as_str(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
    write_atomic(path, &safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

fn prior() -> SdModel<C> {
    SdModel::new(&spec(unet_config(), None), Parts::Prior, Default::default(), 0).unwrap()
}

/// The prior's prediction on fixed inputs.
fn predict(model: &SdModel<C>) -> Vec<f32> {
    let tape = Tape::<C>::new();
    let p = model.store().bind(&tape);
    let x = C::random_normal(&Shape::new([1, 4, 8, 8]), 7, DType::F32, &Default::default()).unwrap();
    let ctx = C::random_normal(&Shape::new([1, 5, 12]), 8, DType::F32, &Default::default()).unwrap();
    let cond = Conditioning {
        t: vec![500.0],
        prompt: PromptEmbedding::Text { values: C::to_vec(&ctx).unwrap(), tokens: 5, dim: 12 },
    };
    let out = lisa_trainer::model::forward_prior(model, &p, &tape.constant(x), &cond).unwrap();
    C::to_vec(&out.value).unwrap()
}

fn store_values(model: &SdModel<C>) -> Vec<Vec<f32>> {
    model.store().iter().map(|(_, p)| C::to_vec(&p.value).unwrap()).collect()
}

#[test]
fn half_precision_and_sharded_folders_load_like_f32() {
    let (_, tensors) = read_diffusers_weights(&fixture("sd15/unet")).unwrap();
    let mut reference = prior();
    reference.load_main(&fixture("sd15/unet")).unwrap();
    let want = predict(&reference);
    for (dtype, tol) in [(Dtype::F16, 2e-2f32), (Dtype::BF16, 1e-1)] {
        let dir = scratch(&format!("{dtype:?}"));
        write_weights(&dir.join("diffusion_pytorch_model.safetensors"), &tensors, dtype);
        let mut m = prior();
        assert_eq!(m.load_main(&dir).unwrap(), tensors.len());
        let got = predict(&m);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(err <= tol * scale, "{dtype:?}: max error {err} of scale {scale}");
    }
    // Sharded: two files and an index, as diffusers writes large models.
    let dir = scratch("sharded");
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
        tensors.clone().into_iter().partition(|(k, _)| k.starts_with("down"));
    write_weights(&dir.join("part-1.safetensors"), &a, Dtype::F32);
    write_weights(&dir.join("part-2.safetensors"), &b, Dtype::F32);
    let map: serde_json::Map<String, Value> = a
        .keys()
        .map(|k| (k.clone(), json!("part-1.safetensors")))
        .chain(b.keys().map(|k| (k.clone(), json!("part-2.safetensors"))))
        .collect();
    let index = json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let mut m = prior();
    m.load_main(&dir).unwrap();
    assert_eq!(predict(&m), want, "sharded f32 loads bit-identically");
}

/// A change made to a weights file's tensors.
type Edit = dyn Fn(&mut BTreeMap<String, (Shape, Vec<f32>)>);

#[test]
fn bad_weights_are_named_and_change_nothing() {
    let (_, tensors) = read_diffusers_weights(&fixture("sd15/unet")).unwrap();
    let cases: Vec<(&str, Box<Edit>, &str)> = vec![
        ("missing", Box::new(|t| drop(t.remove("conv_out.bias"))), "missing tensor main.conv_out.bias"),
        (
            "extra",
            Box::new(|t| drop(t.insert("conv_extra.weight".into(), (Shape::new([1]), vec![0.0])))),
            "unexpected tensor main.conv_extra.weight",
        ),
        (
            "shape",
            Box::new(|t| drop(t.insert("conv_in.bias".into(), (Shape::new([7]), vec![0.0; 7])))),
            "tensor main.conv_in.bias has shape [7]",
        ),
        ("nan", Box::new(|t| t.get_mut("conv_in.bias").unwrap().1[0] = f32::NAN), "main.conv_in.bias holds NaN"),
    ];
    for (name, edit, expect) in cases {
        let dir = scratch(name);
        let mut t = tensors.clone();
        edit(&mut t);
        write_weights(&dir.join("diffusion_pytorch_model.safetensors"), &t, Dtype::F32);
        let mut m = prior();
        let before = store_values(&m);
        let err = m.load_main(&dir).expect_err(name).to_string();
        assert!(err.contains(expect), "{name}: {err}");
        assert!(store_values(&m) == before, "{name}: the model changed");
    }
    // Truncated file, a folder without weights, a missing path.
    let dir = scratch("truncated");
    let bytes = std::fs::read(fixture("sd15/unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = prior().load_main(&dir).unwrap_err().to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors") && err.contains("not a valid safetensors"), "{err}");
    let empty = scratch("empty");
    assert!(prior().load_main(&empty).unwrap_err().to_string().contains("holds neither"));
    assert!(prior().load_main(&empty.join("nope")).unwrap_err().to_string().contains("no such model folder"));
}

#[test]
fn a_saved_controlnet_folder_reloads_identically() {
    let s = spec(unet_config(), Some(read_json_config(&fixture("sd15/controlnet")).unwrap()));
    let mut a = SdModel::<C>::new(&s, Parts::Dual { decoder: false }, Default::default(), 0).unwrap();
    a.load_main(&fixture("sd15/unet")).unwrap();
    a.load_controlnet(&fixture("sd15/controlnet")).unwrap();
    let dir = scratch("saved-controlnet");
    a.save_controlnet(&dir).unwrap();
    // The config diffusers reads back: the same settings as the one we started from.
    let saved = read_json_config(&dir).unwrap();
    let original = read_json_config(&fixture("sd15/controlnet")).unwrap();
    for key in ["block_out_channels", "down_block_types", "conditioning_embedding_out_channels", "cross_attention_dim"]
    {
        assert_eq!(saved[key], original[key], "{key}");
    }
    let mut b = SdModel::<C>::new(&s, Parts::Dual { decoder: false }, Default::default(), 1).unwrap();
    b.load_main(&fixture("sd15/unet")).unwrap();
    assert_eq!(b.load_controlnet(&dir).unwrap(), 260);
    assert!(store_values(&a) == store_values(&b));
}

#[test]
/// Under `mixed_precision` the ControlNet and the decoder keep f32 master weights and compute
/// under autocast in the half type; their gradients come back in f32.
fn mixed_precision_autocasts_the_controlnet_with_f32_master_weights_and_stays_close_to_f32() {
    use lisa_trainer::model::{ForwardOptions, SIDE, forward_train};
    let (_, io) = (0, fixture("sd15/io.safetensors"));
    let bytes = std::fs::read(&io).unwrap();
    let io = lisa_trainer::weights::parse_safetensors(&io, &bytes).unwrap().tensors;
    let t = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &Default::default()).unwrap();
    let ehs = &io["encoder_hidden_states"];
    let cond = Conditioning {
        t: io["timestep"].1.clone(),
        prompt: PromptEmbedding::Text { values: ehs.1.clone(), tokens: 5, dim: 12 },
    };
    let mut outputs = Vec::new();
    for precision in ["no", "bf16", "fp16"] {
        let mut s = spec(unet_config(), Some(read_json_config(&fixture("sd15/controlnet")).unwrap()));
        s.config.insert("mixed_precision".into(), json!(precision));
        s.decoder.hook = Some("mid".parse().unwrap());
        let mut m = SdModel::<C>::new(&s, Parts::Dual { decoder: true }, Default::default(), 0).unwrap();
        m.load_main(&fixture("sd15/unet")).unwrap();
        m.load_controlnet(&fixture("sd15/controlnet")).unwrap();
        for (_, p) in m.store().iter() {
            let want = match (p.name.starts_with("main."), precision) {
                (true, "bf16") => DType::BF16,
                (true, "fp16") => DType::F16,
                _ => DType::F32,
            };
            assert_eq!(C::dtype(&p.value), want, "{precision}: {}", p.name);
        }
        let autocast = match precision {
            "bf16" => Some(DType::BF16),
            "fp16" => Some(DType::F16),
            _ => None,
        };
        assert_eq!(m.store().autocast(), autocast);
        let tape = Tape::<C>::new();
        let bound = m.store().bind(&tape);
        let out = forward_train(
            &m,
            &bound,
            &tape.constant(t("sample")),
            &tape.constant(t("controlnet_cond")),
            &cond,
            ForwardOptions::lisa(true),
        )
        .unwrap();
        assert_eq!(C::dtype(&out.pred.value), DType::F32);
        let (_, g) = C::mse_loss(&out.pred.value, &t("noise")).unwrap();
        let leaves = bound.leaves();
        let grads = tape.backward(&[(&out.pred, g)]).unwrap();
        let id = m.store().find(&format!("{SIDE}controlnet_down_blocks.0.weight")).unwrap();
        let var = leaves.iter().find(|(p, _)| *p == id).unwrap().1;
        assert_eq!(C::dtype(grads.get(var).unwrap()), DType::F32, "{precision}: the master weight's gradient");
        let grad = C::to_vec(grads.get(var).unwrap()).unwrap();
        assert!(grad.iter().all(|v| v.is_finite()) && grad.iter().any(|v| *v != 0.0), "{precision}: side gradient");
        outputs.push((C::to_vec(&out.pred.value).unwrap(), grad));
    }
    let (want, want_grad) = &outputs[0];
    for ((got, grad), (precision, tol)) in outputs[1..].iter().zip([("bf16", 6e-2), ("fp16", 1e-2)]) {
        let rel = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        };
        eprintln!("{precision}: prediction {:.2e}, gradient {:.2e} of scale", rel(got, want), rel(grad, want_grad));
        assert!(rel(got, want) < tol, "{precision}: prediction differs by {} of scale", rel(got, want));
        assert!(rel(grad, want_grad) < 4.0 * tol, "{precision}: gradient differs by {}", rel(grad, want_grad));
    }
}

/// Loading the ControlNet before the UNet gives the same model as the usual order (the UNet's
/// load no longer copies its encoder over a loaded ControlNet), and `Pipeline::build` loads
/// them for a program that embeds the library.
#[test]
fn the_order_of_loading_unet_and_controlnet_does_not_matter() {
    let s = spec(unet_config(), Some(read_json_config(&fixture("sd15/controlnet")).unwrap()));
    let mut usual = SdModel::<C>::new(&s, Parts::Dual { decoder: false }, Default::default(), 0).unwrap();
    usual.load_main(&fixture("sd15/unet")).unwrap();
    usual.load_controlnet(&fixture("sd15/controlnet")).unwrap();
    let mut reversed = SdModel::<C>::new(&s, Parts::Dual { decoder: false }, Default::default(), 0).unwrap();
    reversed.load_controlnet(&fixture("sd15/controlnet")).unwrap();
    reversed.load_main(&fixture("sd15/unet")).unwrap();
    assert!(store_values(&usual) == store_values(&reversed), "the ControlNet loaded first was overwritten");

    // The same through a pipeline folder.
    let dir = scratch("pipeline-build");
    for part in ["unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(part)).unwrap();
    }
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture("sd15/unet").join(f), dir.join("unet").join(f)).unwrap();
    }
    std::fs::write(dir.join("scheduler/scheduler_config.json"), r#"{"prediction_type": "epsilon"}"#).unwrap();
    let pipeline = lisa_trainer::model::sd::Pipeline::open(&dir).unwrap();
    let controlnet = fixture("sd15/controlnet");
    let size = pipeline.training_size(None).unwrap();
    let built_spec =
        pipeline.controlnet_spec(Some(&controlnet), (size, [0, 0]), Default::default(), &Default::default()).unwrap();
    let built = pipeline
        .build::<C>(&built_spec, Parts::Dual { decoder: false }, Some(&controlnet), Default::default(), 0)
        .unwrap();
    assert!(store_values(&usual) == store_values(&built));
}

/// What a training forward holds for the backward: the frozen UNet's encoder records nothing
/// (frozen weights, constant input: no node even with gradients on), and gradient checkpointing
/// drops exactly the whole ControlNet's nodes (the recorded forward holds the checkpointed
/// one's plus the side network's), so it covers every ControlNet block, as diffusers'
/// `enable_gradient_checkpointing` on the ControlNet does. Checked in f32 and under autocast.
#[test]
fn the_backward_holds_only_what_it_needs_and_checkpointing_covers_the_controlnet() {
    use lisa_trainer::model::{ForwardOptions, SideMode, forward_train};
    let io = std::fs::read(fixture("sd15/io.safetensors")).unwrap();
    let io = lisa_trainer::weights::parse_safetensors(&fixture("sd15/io.safetensors"), &io).unwrap().tensors;
    let t = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &Default::default()).unwrap();
    let ehs = &io["encoder_hidden_states"];
    let cond = Conditioning {
        t: io["timestep"].1.clone(),
        prompt: PromptEmbedding::Text { values: ehs.1.clone(), tokens: 5, dim: 12 },
    };
    for precision in ["no", "bf16"] {
        let mut s = spec(unet_config(), Some(read_json_config(&fixture("sd15/controlnet")).unwrap()));
        s.config.insert("mixed_precision".into(), json!(precision));
        s.decoder.hook = Some("mid".parse().unwrap());
        let mut m = SdModel::<C>::new(&s, Parts::Dual { decoder: true }, Default::default(), 0).unwrap();
        m.load_main(&fixture("sd15/unet")).unwrap();
        let held = |side: SideMode| {
            let tape = Tape::<C>::new();
            let bound = m.store().bind(&tape);
            let (x, hint) = (tape.constant(t("sample")), tape.constant(t("controlnet_cond")));
            let options = ForwardOptions { side, ..ForwardOptions::lisa(true) };
            let out = forward_train(&m, &bound, &x, &hint, &cond, options).unwrap();
            assert!(out.pred.requires_grad());
            tape.live_nodes()
        };
        let (recorded, checkpointed) = (held(SideMode::Recorded), held(SideMode::Checkpointed));
        let tape = Tape::<C>::new();
        let bound = m.store().bind(&tape);
        let x = tape.constant(t("sample"));
        m.encode_main(&bound, &x, &cond).unwrap();
        assert_eq!(tape.live_nodes(), 0, "{precision}: the frozen encoder recorded nodes");
        m.side(&bound, &x, &tape.constant(t("controlnet_cond")), &cond).unwrap();
        let side = tape.live_nodes();
        assert!(side > 0 && checkpointed > 0, "{precision}");
        assert_eq!(recorded, checkpointed + side, "{precision}: checkpointing drops exactly the ControlNet's nodes");
    }
}

/// SDXL's `transformer_layers_per_block`: an int or one per level; a wrong count, a nested
/// list (diffusers' per-layer form, not supported), a zero or a ControlNet of other depths is
/// an error naming the key; a ControlNet made from such a UNet writes diffusers' key back.
#[test]
fn transformer_depths_per_level_are_read_checked_and_written_back() {
    use lisa_trainer::model::sd::UNetConfig;
    let mut c = unet_config();
    c.insert("transformer_layers_per_block".into(), json!([1, 2]));
    assert!(config_error(c, None).contains("transformer_layers_per_block has 2 entries for 3 blocks"));
    let mut c = unet_config();
    c.insert("transformer_layers_per_block".into(), json!([[1], [2, 2], [3]]));
    assert!(config_error(c, None).contains("transformer_layers_per_block"));
    let mut c = unet_config();
    c.insert("transformer_layers_per_block".into(), json!([1, 0, 1]));
    assert!(config_error(c, None).contains("transformer_layers_per_block: every entry must be at least 1"));
    let xl = read_json_config(&fixture("sdxl_layers/unet")).unwrap();
    let err = config_error(xl.clone(), Some(read_json_config(&fixture("sd21/controlnet")).unwrap()));
    assert!(err.contains("transformer_layers_per_block"), "{err}");
    let config = UNetConfig::from_unet_json(&xl).unwrap();
    assert_eq!(config.transformer_layers, vec![1, 2, 3]);
    let extras =
        UNetConfig::from_controlnet_json(&read_json_config(&fixture("sdxl_layers/controlnet")).unwrap()).unwrap().1;
    assert_eq!(config.controlnet_json(&extras)["transformer_layers_per_block"], json!([1, 2, 3]));
    assert_eq!(UNetConfig::from_unet_json(&unet_config()).unwrap().transformer_layers_per_block(), json!(1));
}

/// SDXL's `addition_embed_type = "text_time"`: other addition types, a half-given
/// `text_time`, widths that leave no room for the pooled text, a ControlNet without it, and
/// `add_time_ids` for a UNet without it are errors naming the key; the ControlNet's config
/// writes the three keys back; the time ids default to the trained resolution, uncropped.
#[test]
fn sdxl_text_time_is_read_checked_and_written_back() {
    use lisa_trainer::model::sd::{TextTimeConfig, UNetConfig};
    let xl = read_json_config(&fixture("sdxl/unet")).unwrap();
    let with = |key: &str, v: Value| {
        let mut c = xl.clone();
        c.insert(key.into(), v);
        c
    };
    let err = config_error(with("addition_embed_type", json!("text")), None);
    assert!(err.contains("addition_embed_type = \"text\" is not supported"), "{err}");
    let err = config_error(with("addition_time_embed_dim", Value::Null), None);
    assert!(err.contains("needs addition_time_embed_dim and projection_class_embeddings_input_dim"), "{err}");
    let err = config_error(with("projection_class_embeddings_input_dim", json!(24)), None);
    assert!(err.contains("projection_class_embeddings_input_dim 24 leaves no room for the pooled text"), "{err}");
    let err = config_error(with("addition_embed_type", Value::Null), None);
    assert!(err.contains("without addition_embed_type"), "{err}");
    let mut controlnet = read_json_config(&fixture("sdxl/controlnet")).unwrap();
    for key in ["addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"] {
        controlnet.remove(key);
    }
    let err = config_error(xl.clone(), Some(controlnet));
    assert!(err.contains("the ControlNet does not fit the UNet: addition_embed_type text_time"), "{err}");

    let config = UNetConfig::from_unet_json(&xl).unwrap();
    let tt = config.text_time.unwrap();
    assert_eq!(tt, TextTimeConfig { time_embed_dim: 4, input_dim: 34 });
    assert_eq!(tt.pooled_dim(), 10);
    let extras = UNetConfig::from_controlnet_json(&read_json_config(&fixture("sdxl/controlnet")).unwrap()).unwrap().1;
    let written = config.controlnet_json(&extras);
    assert_eq!(written["addition_embed_type"], json!("text_time"));
    assert_eq!(written["addition_time_embed_dim"], json!(4));
    assert_eq!(written["projection_class_embeddings_input_dim"], json!(34));
    let sd15 = UNetConfig::from_unet_json(&unet_config()).unwrap();
    assert_eq!(sd15.controlnet_json(&extras)["addition_embed_type"], Value::Null);

    // add_time_ids: only for text_time, finite; default = the resolution, uncropped.
    let mut s = spec(unet_config(), None);
    s.config.insert("add_time_ids".into(), json!([512, 512, 0, 0, 512, 512]));
    assert!(registry::validate(&s).unwrap_err().to_string().contains("add_time_ids are read by an SDXL UNet"));
    let model = SdModel::<C>::new(&spec(xl.clone(), None), Parts::Prior, Default::default(), 0).unwrap();
    assert_eq!(model.add_time_ids(), Some([64.0, 64.0, 0.0, 0.0, 64.0, 64.0]), "sample_size 8 × the VAE's 8");
    let mut s = spec(xl.clone(), None);
    s.config.insert("latent_size".into(), json!(16));
    let model = SdModel::<C>::new(&s, Parts::Prior, Default::default(), 0).unwrap();
    assert_eq!(model.add_time_ids(), Some([128.0, 128.0, 0.0, 0.0, 128.0, 128.0]));
    assert_eq!(
        SdModel::<C>::new(&spec(unet_config(), None), Parts::Prior, Default::default(), 0).unwrap().add_time_ids(),
        None
    );
}

/// An SDXL model reads pooled text beside the tokens: text alone, pooled text of another
/// width, or a pooled table for a UNet without `text_time` are errors before any work.
#[test]
fn sdxl_prompts_need_their_pooled_embeddings() {
    let dir = scratch("sdxl-pooled");
    let device = Default::default();
    let table = |name: &str, dims: [usize; 2]| {
        let path = dir.join(name);
        let t = C::from_slice(&vec![0.5; dims[0] * dims[1]], &Shape::new(dims), DType::F32, &device).unwrap();
        let bytes = lisa_trainer::weights::to_safetensors::<C>(&[("".to_string(), &t)], BTreeMap::new()).unwrap();
        write_atomic(&path, &bytes).unwrap();
        path
    };
    let (text, pooled, wide) =
        (table("text.safetensors", [5, 12]), table("pooled.safetensors", [1, 10]), table("wide.safetensors", [1, 11]));
    let xl = read_json_config(&fixture("sdxl/unet")).unwrap();
    let mut model = SdModel::<C>::new(&spec(xl, None), Parts::Prior, device, 0).unwrap();
    let err = model.read_text_embeddings(&text, None).unwrap_err().to_string();
    assert!(err.contains("reads pooled_text_embeddings beside text_embeddings"), "{err}");
    let err = model.read_text_embeddings(&text, Some(&wide)).unwrap_err().to_string();
    assert!(err.contains("wide.safetensors") && err.contains("[tokens, 10]"), "{err}");
    model.read_text_embeddings(&text, Some(&pooled)).unwrap();
    let PromptEmbedding::TextPooled { pooled: p, pooled_dim: 10, .. } = model.embed_prompts(&[""]).unwrap() else {
        panic!("an SDXL model's prompts carry pooled text")
    };
    assert_eq!(p, vec![0.5; 10]);
    // A forward with text alone says what is missing.
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let x = tape.constant(C::from_slice(&[0.1; 4 * 64], &Shape::new([1, 4, 8, 8]), DType::F32, &device).unwrap());
    let cond =
        Conditioning { t: vec![10.0], prompt: PromptEmbedding::Text { values: vec![0.5; 60], tokens: 5, dim: 12 } };
    let err = model.encode_main(&bound, &x, &cond).err().unwrap().to_string();
    assert!(err.contains("reads text embeddings with pooled ones"), "{err}");

    let mut sd15 = SdModel::<C>::new(&spec(unet_config(), None), Parts::Prior, device, 0).unwrap();
    let err = sd15.read_text_embeddings(&text, Some(&pooled)).unwrap_err().to_string();
    assert!(err.contains("this UNet has none"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The memory check before a run counts parameters from the config alone: at SD 1.5's and
/// SDXL's real sizes it stays within 0.5 % of what diffusers 0.42.1 counts
/// (`scripts/goldens/diffusers_parameter_counts.py`, same configs).
#[test]
fn parameter_estimates_match_diffusers_counts_at_real_sizes() {
    use lisa_trainer::model::sd::UNetConfig;
    let sd15 = json!({
        "sample_size": 64, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    });
    let sdxl = json!({
        "sample_size": 128, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "norm_num_groups": 32,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    });
    for (name, config, unet, controlnet) in
        [("sd15", sd15, 859_520_964u128, 361_279_120u128), ("sdxl", sdxl, 2_567_463_684, 1_251_014_160)]
    {
        let estimate = UNetConfig::from_unet_json(config.as_object().unwrap()).unwrap().parameter_estimate();
        for (part, ours, theirs) in [("UNet", estimate.unet, unet), ("ControlNet", estimate.controlnet, controlnet)] {
            let off = (ours as f64 - theirs as f64).abs() / theirs as f64;
            assert!(off < 0.005, "{name} {part}: estimate {ours}, diffusers {theirs} ({:.2} % off)", 100.0 * off);
        }
    }
}

/// `zero_null_prompt` (diffusers' `force_zeros_for_empty_prompt`, on in SDXL pipelines): under
/// classifier-free guidance the unconditional branch reads zeros, not the empty prompt's
/// embedding; off, it reads the empty prompt's.
#[test]
fn sdxl_guidance_can_read_zeros_for_the_empty_prompt() {
    use lisa_trainer::sample::{SampleConfig, sample, sample_embedded};
    use lisa_trainer::scheduler::NoiseConfig;
    let dir = scratch("sdxl-zero-null");
    let device = Default::default();
    let table = |name: &str, entries: &[(&str, usize, f32)]| {
        let tensors: Vec<(String, lisa_cpu::CpuTensor)> = entries
            .iter()
            .map(|&(prompt, width, v)| {
                let values: Vec<f32> =
                    (0..width * if name == "text" { 5 } else { 1 }).map(|i| v + i as f32 * 0.01).collect();
                let dims = if name == "text" { [5, width] } else { [1, width] };
                (prompt.to_string(), C::from_slice(&values, &Shape::new(dims), DType::F32, &device).unwrap())
            })
            .collect();
        let refs: Vec<(String, &lisa_cpu::CpuTensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
        let path = dir.join(format!("{name}.safetensors"));
        write_atomic(&path, &lisa_trainer::weights::to_safetensors::<C>(&refs, BTreeMap::new()).unwrap()).unwrap();
        path
    };
    let text = table("text", &[("", 12, 0.7), ("a circle", 12, -0.3)]);
    let pooled = table("pooled", &[("", 10, 0.5), ("a circle", 10, -0.2)]);
    let xl = read_json_config(&fixture("sdxl/unet")).unwrap();
    let mut model = SdModel::<C>::new(&spec(xl, None), Parts::Dual { decoder: false }, device, 3).unwrap();
    model.read_text_embeddings(&text, Some(&pooled)).unwrap();
    let noise = NoiseConfig::Diffusion {
        betas: lisa_core::schedule::BetaSchedule::SD_SCALED_LINEAR,
        num_train_timesteps: 1000,
    };
    let [c, h, w] = model.hint_shape();
    let hint = C::full(&Shape::new([1, c, h, w]), 0.5, DType::F32, &device).unwrap();
    let cfg = SampleConfig { steps: 2, guidance_scale: 3.0, clip_sample: false, ..SampleConfig::default() };
    let run = |cfg: &SampleConfig| C::to_vec(&sample(&model, &noise, &hint, &["a circle"], cfg).unwrap()).unwrap();
    let zeros = run(&SampleConfig { zero_null_prompt: true, ..cfg.clone() });
    let prompt = model.embed_prompts(&["a circle"]).unwrap();
    let PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } = prompt.clone() else {
        panic!("SDXL prompts carry pooled text")
    };
    let null = PromptEmbedding::TextPooled {
        values: vec![0.0; values.len()],
        tokens,
        dim,
        pooled: vec![0.0; pooled.len()],
        pooled_dim,
    };
    let explicit = C::to_vec(&sample_embedded(&model, &noise, &hint, &prompt, &null, &cfg).unwrap()).unwrap();
    assert_eq!(zeros, explicit, "the unconditional branch reads zeros");
    assert_ne!(zeros, run(&cfg), "off, it reads the empty prompt's embedding");
    std::fs::remove_dir_all(&dir).unwrap();
}
