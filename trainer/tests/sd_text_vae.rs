//! Parity of the VAE (`AutoencoderKL`, current and legacy attention names), the CLIP text
//! encoder (quick_gelu and gelu; names with and without `text_model.`) and the CLIP
//! tokenizer (from `tokenizer.json` and from `vocab.json` + `merges.txt`) with diffusers /
//! transformers, through golden files made by `scripts/goldens/diffusers_vae_clip.py`; and the
//! VAE in SD3's form (16 latent channels, no quant convs, shifted latents) through
//! `scripts/goldens/diffusers_sd3_vae.py`.

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::DType;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::sd::{
    AutoencoderKl, ClipTextConfig, ClipTextModel, ClipTokenizer, VaeConfig, load_clip, load_vae, read_json_config,
};
use lisa_trainer::params::ParamStore;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

fn vae(dir: &Path) -> (ParamStore<C>, AutoencoderKl) {
    let config = VaeConfig::from_json(&read_json_config(&fixture("vae")).unwrap()).unwrap();
    let mut store = ParamStore::new(CpuDevice, 0).freeze_prefix("vae.");
    let model = AutoencoderKl::new(&mut store, "vae.", &config).unwrap();
    assert_eq!(load_vae(&mut store, "vae.", dir).unwrap(), 180);
    (store, model)
}

#[test]
fn vae_encoder_and_decoder_match_diffusers_with_current_and_legacy_names() {
    let (io, _) = read(&fixture("vae/io.safetensors"));
    let t = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &CpuDevice).unwrap();
    for dir in [fixture("vae"), fixture("vae/legacy")] {
        let (store, model) = vae(&dir);
        let tape = Tape::<C>::new();
        let p = store.bind(&tape);
        let (mean, logvar) = model.encode(&p, &tape.constant(t("image"))).unwrap();
        let name = dir.display().to_string();
        assert_parity(&format!("{name} mean"), &C::to_vec(&mean.value).unwrap(), &io["latent_mean"].1);
        assert_parity(&format!("{name} logvar (clamped)"), &C::to_vec(&logvar.value).unwrap(), &io["latent_logvar"].1);
        let latents = model.latents(&p, &tape.constant(t("image"))).unwrap();
        assert_parity(&format!("{name} latents"), &C::to_vec(&latents.value).unwrap(), &io["latents_scaled"].1);
        let decoded = model.decode(&p, &tape.constant(t("z"))).unwrap();
        assert_parity(&format!("{name} decoded"), &C::to_vec(&decoded.value).unwrap(), &io["decoded"].1);
    }
}

/// SD3's VAE: `(mean − shift_factor) · scaling_factor` and back, without `quant_conv` and
/// `post_quant_conv`.
#[test]
fn an_sd3_vae_shifts_its_latents_and_has_no_quant_convs() {
    let dir = fixture("sd3/vae");
    let (io, _) = read(&dir.join("io.safetensors"));
    let t = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &CpuDevice).unwrap();
    let config = VaeConfig::from_json(&read_json_config(&dir.join("vae")).unwrap()).unwrap();
    assert!(!config.use_quant_conv && !config.use_post_quant_conv && config.shift_factor == 0.0609);
    let mut store = ParamStore::new(CpuDevice, 0).freeze_prefix("");
    let model = AutoencoderKl::new(&mut store, "", &config).unwrap();
    load_vae(&mut store, "", &dir.join("vae")).unwrap();
    assert!(store.find("quant_conv.weight").is_none());
    let tape = Tape::<C>::new();
    let p = store.bind(&tape);
    let latents = model.latents(&p, &tape.constant(t("image"))).unwrap();
    assert_parity("sd3 vae latents", &C::to_vec(&latents.value).unwrap(), &io["latents"].1);
    let decoded = model.decode_latents(&p, &tape.constant(t("latents"))).unwrap();
    assert_parity("sd3 vae decoded", &C::to_vec(&decoded.value).unwrap(), &io["decoded"].1);
}

#[test]
fn clip_text_encoders_match_transformers() {
    let (io, meta) = read(&fixture("clip/io.safetensors"));
    let ids: Vec<Vec<u32>> = io["input_ids"].1.chunks(77).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
    for (dir, key) in [("clip/text_encoder", "last_hidden_state"), ("clip/text_encoder_gelu", "last_hidden_state_gelu")]
    {
        let config = ClipTextConfig::from_json(&read_json_config(&fixture(dir)).unwrap()).unwrap();
        let mut store = ParamStore::<C>::new(CpuDevice, 0).freeze_prefix("text.");
        let model = ClipTextModel::new(&mut store, "text.", &config).unwrap();
        load_clip(&mut store, "text.", &fixture(dir)).unwrap();
        let tape = Tape::<C>::new();
        let p = store.bind(&tape);
        let out = model.forward(&p, &ids).unwrap();
        assert_eq!(C::shape(&out.value).dims(), &[ids.len(), 77, config.hidden_size]);
        assert_parity(dir, &C::to_vec(&out.value).unwrap(), &io[key].1);
    }
    assert!(meta.contains_key("prompts"));
}

#[test]
fn clip_tokenizer_ids_match_transformers_exactly() {
    let (io, meta) = read(&fixture("clip/io.safetensors"));
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for (dir, key) in [("clip/tokenizer", "input_ids"), ("clip/tokenizer_nojson", "input_ids_nojson")] {
        let tok = ClipTokenizer::from_dir(&fixture(dir)).unwrap();
        let got = tok.encode(&refs).unwrap();
        let want: Vec<Vec<u32>> = io[key].1.chunks(77).map(|r| r.iter().map(|&v| v as u32).collect()).collect();
        for (i, (g, w)) in got.ids.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{dir}: prompt {i} {:?}", prompts[i]);
        }
        let truncated: Vec<usize> = prompts.iter().enumerate().filter(|(_, p)| p.len() > 300).map(|(i, _)| i).collect();
        assert_eq!(got.truncated, truncated, "{dir}: truncated prompts");
    }
}

#[test]
fn bad_vae_clip_and_tokenizer_inputs_are_named() {
    let mut cfg = read_json_config(&fixture("vae")).unwrap();
    cfg.insert("latents_mean".into(), serde_json::json!([0.1, 0.2, 0.3, 0.4]));
    assert!(VaeConfig::from_json(&cfg).unwrap_err().to_string().contains("latents_mean"));
    let mut cfg = read_json_config(&fixture("vae")).unwrap();
    cfg.insert("down_block_types".into(), serde_json::json!(["DownEncoderBlock2D"]));
    assert!(VaeConfig::from_json(&cfg).unwrap_err().to_string().contains("down_block_types"));
    let mut cfg = read_json_config(&fixture("clip/text_encoder")).unwrap();
    cfg.insert("hidden_act".into(), serde_json::json!("relu"));
    assert!(ClipTextConfig::from_json(&cfg).unwrap_err().to_string().contains("hidden_act"));
    let empty = std::env::temp_dir().join(format!("lisa-empty-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert!(ClipTokenizer::from_dir(&empty).unwrap_err().to_string().contains("neither tokenizer.json"));
    std::fs::write(empty.join("tokenizer.json"), "{not json").unwrap();
    assert!(ClipTokenizer::from_dir(&empty).unwrap_err().to_string().contains("tokenizer.json"));
    // A text encoder folder without its weights.
    assert!(
        load_clip(&mut ParamStore::<C>::new(CpuDevice, 0), "t.", &empty)
            .unwrap_err()
            .to_string()
            .contains("model.safetensors")
    );
}
