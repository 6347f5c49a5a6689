//! SD3's text side against transformers and diffusers (golden files made by
//! `scripts/goldens/transformers_sd3_text.py` with transformers 5.24.0 / diffusers 0.42.1 /
//! torch 2.15.0, in `tests/fixtures/sd3/text`): the token ids of both CLIP tokenizers (one
//! padding with its end token, one with "!") and of the T5 tokenizer (padded, and cut before
//! its end token), each `CLIPTextModelWithProjection`'s penultimate hidden states and projected
//! pooled output (pooled at the largest id, and at the first end token), `T5EncoderModel`'s
//! hidden states (logarithmic position buckets in use), and the pipeline's `prompt_embeds` and
//! `pooled_prompt_embeds`; and the precomputed tables an `sd3` model reads.

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::{Backend, DType};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::PromptEmbedding;
use lisa_trainer::model::sd::{ClipTextConfig, ClipTextModel, ClipTokenizer, PromptTable, load_clip, read_json_config};
use lisa_trainer::model::sd3::Sd3TextEncoders;
use lisa_trainer::model::t5::{T5Config, T5Encoder, T5Tokenizer, load_t5};
use lisa_trainer::params::ParamStore;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3/text")
}

fn prompts() -> Vec<String> {
    let (_, meta) = read(&fixture().join("io.safetensors"));
    serde_json::from_str(&meta["prompts"]).unwrap()
}

fn ids_of(rows: &[Vec<u32>]) -> Vec<f32> {
    rows.iter().flatten().map(|&i| i as f32).collect()
}

fn check_parts<B: Backend>(device: B::Device) {
    let dir = fixture();
    let (io, meta) = read(&dir.join("io.safetensors"));
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    for (i, (te, tok)) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")].into_iter().enumerate() {
        let k = i + 1;
        let tokenizer = ClipTokenizer::from_dir(&dir.join(tok)).unwrap();
        let ids = tokenizer.encode(&prompts).unwrap();
        assert_eq!(ids_of(&ids.ids), io[&format!("ids_{k}")].1, "{tok} ids");
        let config = ClipTextConfig::from_json(&read_json_config(&dir.join(te)).unwrap()).unwrap();
        let mut store = ParamStore::<B>::new(device.clone(), 0).freeze_prefix("");
        let model = ClipTextModel::with_projection(&mut store, "", &config).unwrap();
        assert!(load_clip(&mut store, "", &dir.join(te)).unwrap() > 0);
        let tape = Tape::<B>::new();
        let p = store.bind(&tape);
        let out = model.forward_projected(&p, &ids.ids).unwrap();
        let v = |t: &B::Tensor| B::to_vec(t).unwrap();
        assert_parity(&format!("{te} penultimate"), &v(&out.penultimate.value), &io[&format!("clip_{k}_hidden")].1);
        assert_parity(&format!("{te} pooled"), &v(&out.pooled.value), &io[&format!("clip_{k}_pooled")].1);
    }
    let max_len: usize = meta["max_sequence_length"].parse().unwrap();
    let tokenizer = T5Tokenizer::from_dir(&dir.join("tokenizer_3")).unwrap();
    let ids = tokenizer.encode(&prompts, max_len).unwrap();
    assert_eq!(ids_of(&ids.ids), io["ids_3"].1, "T5 ids");
    assert_eq!(ids.truncated, vec![2], "the long prompt is cut");
    let config = T5Config::from_json(&read_json_config(&dir.join("text_encoder_3")).unwrap()).unwrap();
    let mut store = ParamStore::<B>::new(device.clone(), 0).freeze_prefix("");
    let model = T5Encoder::new(&mut store, "", &config).unwrap();
    assert!(load_t5(&mut store, "", &dir.join("text_encoder_3")).unwrap() > 0);
    let tape = Tape::<B>::new();
    let p = store.bind(&tape);
    let h = model.forward(&p, &ids.ids).unwrap();
    assert_parity("T5 last_hidden_state", &B::to_vec(&h.value).unwrap(), &io["t5_hidden"].1);

    let encoders = Sd3TextEncoders::<B>::open(&dir, device, DType::F32, max_len, config.d_model).unwrap();
    let PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } = encoders.encode(&prompts).unwrap()
    else {
        panic!("pooled text")
    };
    assert_eq!((tokens, dim, pooled_dim), (77 + max_len, config.d_model, 32));
    assert_parity("prompt_embeds", &values, &io["prompt_embeds"].1);
    assert_parity("pooled_prompt_embeds", &pooled, &io["pooled_prompt_embeds"].1);
}

#[test]
fn sd3_text_encoders_match_transformers_on_cpu() {
    check_parts::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn sd3_text_encoders_match_transformers_on_wgpu() {
    if let Some(reason) = lisa_cubecl::skip_unless_available::<lisa_cubecl::WgpuRuntime>() {
        eprintln!("skipped: {reason}");
        return;
    }
    check_parts::<lisa_cubecl::WgpuBackend>(lisa_cubecl::WgpuBackend::probe().unwrap());
}

/// The tables written once for training hold what the encoders make, under each prompt's
/// name; and a T5 folder of another width, or a missing tokenizer, is refused by name.
#[test]
fn precomputed_tables_and_bad_folders() {
    type C = lisa_cpu::CpuBackend;
    let dir = fixture();
    let (_, meta) = read(&dir.join("io.safetensors"));
    let max_len: usize = meta["max_sequence_length"].parse().unwrap();
    let encoders = Sd3TextEncoders::<C>::open(&dir, lisa_cpu::CpuDevice, DType::F32, max_len, 48).unwrap();
    let out = std::env::temp_dir().join(format!("lisa-sd3-text-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let (text, pooled) = (out.join("prompt_embeds.safetensors"), out.join("pooled_prompt_embeds.safetensors"));
    let prompts = ["a red circle on a blue ground", "", "a red circle on a blue ground"];
    encoders.write_tables(&prompts, (&text, &pooled), &Default::default()).unwrap();
    let (t, q) = (PromptTable::read(&text, 48).unwrap(), PromptTable::read(&pooled, 32).unwrap());
    assert_eq!((t.tokens, q.tokens), (77 + max_len, 1));
    let PromptEmbedding::TextPooled { values, pooled: pools, .. } = encoders.encode(&prompts).unwrap() else {
        panic!("pooled text")
    };
    assert_eq!(t.lookup(&prompts).unwrap(), values);
    assert_eq!(q.lookup(&prompts).unwrap(), pools);
    std::fs::remove_dir_all(&out).unwrap();

    let err = Sd3TextEncoders::<C>::open(&dir, lisa_cpu::CpuDevice, DType::F32, max_len, 64).err().unwrap().to_string();
    assert!(err.contains("text_encoder_3") && err.contains("joint_attention_dim"), "{err}");
    let err = Sd3TextEncoders::<C>::open(&dir, lisa_cpu::CpuDevice, DType::F32, max_len, 32).err().unwrap().to_string();
    assert!(err.contains("CLIPs are 40 wide"), "{err}");
    assert!(T5Tokenizer::from_dir(&dir.join("nope")).unwrap_err().to_string().contains("tokenizer.json"));
}
