//! SDXL's text side against diffusers (golden file made by
//! `scripts/goldens/diffusers_sdxl_text.py` with diffusers 0.42.1 / transformers 5.24.0 /
//! torch 2.15.0, in `tests/fixtures/sd/sdxl_text`): `StableDiffusionXLPipeline.encode_prompt`'s
//! `prompt_embeds` (a `CLIPTextModel`'s and a `CLIPTextModelWithProjection`'s penultimate hidden
//! states side by side) and `pooled_prompt_embeds` (the second's projected pooled output), for
//! a short prompt, the empty prompt and a prompt cut at 77 tokens; the tables an SDXL `sd`
//! model reads; and a pipeline folder without its second encoder, refused by name.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::model::PromptEmbedding;
use lisa_trainer::model::sd::{PromptTable, SdxlTextEncoders, sdxl_text_widths};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The text half of an SDXL pipeline folder, assembled from the fixtures the golden script
/// used.
fn text_folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-sdxl-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let f = fixtures();
    for (from, to) in [
        (f.join("clip/text_encoder"), "text_encoder"),
        (f.join("clip/tokenizer"), "tokenizer"),
        (f.join("sd3/text/text_encoder_2"), "text_encoder_2"),
        (f.join("sd3/text/tokenizer_2"), "tokenizer_2"),
    ] {
        std::fs::create_dir_all(dir.join(to)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap().path();
            std::fs::copy(&e, dir.join(to).join(e.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn check<B: Backend>(device: B::Device) {
    let (io, meta) = read(&fixtures().join("sd/sdxl_text/io.safetensors"));
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let dir = text_folder(B::name());
    assert_eq!(sdxl_text_widths(&dir).unwrap(), (56, 20));
    let encoders = SdxlTextEncoders::<B>::open(&dir, device, DType::F32).unwrap();
    let (embedding, truncated) = encoders.encode(&prompts).unwrap();
    assert_eq!(truncated, vec![2], "the long prompt is cut");
    let PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } = embedding else {
        panic!("SDXL's prompts carry pooled text")
    };
    assert_eq!((tokens, dim, pooled_dim), (77, 56, 20));
    assert_parity("prompt_embeds", &values, &io["prompt_embeds"].1);
    assert_parity("pooled_prompt_embeds", &pooled, &io["pooled_prompt_embeds"].1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sdxl_text_encoders_match_diffusers_on_cpu() {
    check::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn sdxl_text_encoders_match_diffusers_on_wgpu() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    check::<lisa_cubecl::WgpuBackend>(lisa_cubecl::WgpuBackend::probe().unwrap());
}

/// The tables written for training hold each distinct prompt once, under its name, as the
/// encoders make it; a folder without `text_encoder_2/` is an error naming it.
#[test]
fn sdxl_tables_and_a_missing_second_encoder() {
    type C = lisa_cpu::CpuBackend;
    let dir = text_folder("tables");
    let encoders = SdxlTextEncoders::<C>::open(&dir, lisa_cpu::CpuDevice, DType::F32).unwrap();
    let (text, pooled) = (dir.join("text.safetensors"), dir.join("pooled.safetensors"));
    let cut = encoders.write_tables(&["b", "a", "b", ""], (&text, &pooled), &BTreeMap::new()).unwrap();
    assert!(cut.is_empty());
    let (t, p) = (PromptTable::read(&text, 56).unwrap(), PromptTable::read(&pooled, 20).unwrap());
    assert_eq!((t.tokens, p.tokens), (77, 1));
    let (PromptEmbedding::TextPooled { values, pooled: pools, .. }, _) = encoders.encode(&["a", ""]).unwrap() else {
        panic!("pooled text")
    };
    assert_eq!(t.lookup(&["a", ""]).unwrap(), values);
    assert_eq!(p.lookup(&["a", ""]).unwrap(), pools);
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    let err = SdxlTextEncoders::<C>::open(&dir, lisa_cpu::CpuDevice, DType::F32).err().unwrap().to_string();
    assert!(err.contains("text_encoder_2"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
