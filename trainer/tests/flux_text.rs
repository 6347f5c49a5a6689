//! Flux's text side against diffusers (golden file made by
//! `scripts/goldens/diffusers_flux_text.py` with diffusers 0.42.1 / transformers 5.24.0, in
//! `tests/fixtures/flux/text`): `FluxPipeline.encode_prompt`'s `prompt_embeds` (T5's last
//! hidden states, 16 tokens, one prompt cut) and `pooled_prompt_embeds` (CLIPTextModel's
//! `pooler_output`), from the CLIP and T5 fixtures; the tables written for a `flux` model;
//! bad folders refused by name.

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::DType;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::model::PromptEmbedding;
use lisa_trainer::model::flux::FluxTextEncoders;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The text half of a Flux pipeline folder, assembled from the fixtures the golden script
/// read.
fn text_folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-flux-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let f = fixtures();
    for (from, to) in [
        (f.join("clip/text_encoder"), "text_encoder"),
        (f.join("clip/tokenizer"), "tokenizer"),
        (f.join("sd3/text/text_encoder_3"), "text_encoder_2"),
        (f.join("sd3/text/tokenizer_3"), "tokenizer_2"),
    ] {
        std::fs::create_dir_all(dir.join(to)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap().path();
            if e.is_file() {
                std::fs::copy(&e, dir.join(to).join(e.file_name().unwrap())).unwrap();
            }
        }
    }
    dir
}

#[test]
fn flux_text_encoders_match_diffusers_on_cpu() {
    let (io, meta) = read(&fixtures().join("flux/text/io.safetensors"));
    let prompts: Vec<String> = serde_json::from_str(&meta["prompts"]).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let max_len: usize = meta["max_sequence_length"].parse().unwrap();
    let dir = text_folder("parity");
    let text = FluxTextEncoders::<C>::open(&dir, CpuDevice, DType::F32, max_len, (48, 32)).unwrap();
    let PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } = text.encode(&prompts).unwrap() else {
        panic!("Flux's text is tokens with pooled text");
    };
    assert_eq!((tokens, dim, pooled_dim), (max_len, 48, 32));
    assert_parity("flux prompt_embeds", &values, &io["prompt_embeds"].1);
    assert_parity("flux pooled_prompt_embeds", &pooled, &io["pooled_prompt_embeds"].1);

    // The tables a flux model reads: one row each, named by the prompt.
    let (t, p) = (dir.join("text.safetensors"), dir.join("pooled.safetensors"));
    text.write_tables(&prompts, (&t, &p), &Default::default()).unwrap();
    let (table, _) = read(&p);
    assert_eq!(table[prompts[0]].0.dims(), &[1, 32]);
    assert_eq!(read(&t).0[""].0.dims(), &[max_len, 48]);

    // Widths the transformer does not read, and a missing T5, are refused by name.
    let err = FluxTextEncoders::<C>::open(&dir, CpuDevice, DType::F32, max_len, (48, 768)).err().unwrap().to_string();
    assert!(err.contains("text_encoder") && err.contains("pooled_projection_dim"), "{err}");
    let err = FluxTextEncoders::<C>::open(&dir, CpuDevice, DType::F32, max_len, (4096, 32)).err().unwrap().to_string();
    assert!(err.contains("text_encoder_2") && err.contains("joint_attention_dim"), "{err}");
    std::fs::remove_dir_all(dir.join("text_encoder_2")).unwrap();
    assert!(FluxTextEncoders::<C>::open(&dir, CpuDevice, DType::F32, max_len, (48, 32)).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
