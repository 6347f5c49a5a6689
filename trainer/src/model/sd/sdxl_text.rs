//! SDXL's text side, as `StableDiffusionXLPipeline.encode_prompt` and
//! train_controlnet_sdxl.py compute it: `CLIPTextModel` (`text_encoder/` with `tokenizer/`)
//! and `CLIPTextModelWithProjection` (`text_encoder_2/` with `tokenizer_2/`) each give their
//! penultimate hidden states, concatenated along the width
//! (`prompt_embeds = [h₁ ‖ h₂]`, 77 tokens of `768 + 1280 = 2048` in SDXL); the second gives the
//! pooled text (`text_embeds`, its projection of the end token's final-normed state, 1280).
//! Both frozen, run without recording.

use std::collections::BTreeMap;
use std::path::Path;

use lisa_core::backend::{Backend, DType};

use super::clip::{ClipTextModel, load_clip};
use super::encoders::{cast_all, read_text_pair};
use super::text::encode_prompt_tables;
use super::tokenizer::ClipTokenizer;
use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::model::PromptEmbedding;
use crate::params::{ParamStore, Scope};
use crate::weights::bad;

/// The most prompts one encoder pass holds.
const CHUNK: usize = 8;

/// The two text encoders of an SDXL pipeline folder with their tokenizers.
pub struct SdxlTextEncoders<B: Backend> {
    store: ParamStore<B>,
    first: (ClipTokenizer, ClipTextModel),
    second: (ClipTokenizer, ClipTextModel),
}

/// The widths an SDXL pipeline's text encoders make: `(cross_attention_dim, pooled_dim)`
/// = (the two hidden sizes together, the second's `projection_dim`), from their configs
/// (checked to be pairs with their tokenizers); errors name the folder.
pub fn sdxl_text_widths(pipeline: &Path) -> Result<(usize, usize)> {
    let (first, _) = read_text_pair(&pipeline.join("text_encoder"), &pipeline.join("tokenizer"))?;
    let (second, _) = read_text_pair(&pipeline.join("text_encoder_2"), &pipeline.join("tokenizer_2"))?;
    Ok((first.hidden_size + second.hidden_size, second.projection_dim))
}

impl<B: Backend> SdxlTextEncoders<B> {
    /// From an SDXL pipeline folder's `text_encoder{,_2}/` and `tokenizer{,_2}/`, weights
    /// stored as `dtype`. Pairs that do not match, or tokenizers of different lengths, are
    /// errors naming the folder.
    pub fn open(pipeline: &Path, device: B::Device, dtype: DType) -> Result<Self> {
        let mut store = ParamStore::new(device, 0).freeze_prefix("");
        let (config, tokenizer) = read_text_pair(&pipeline.join("text_encoder"), &pipeline.join("tokenizer"))?;
        let first = ClipTextModel::new(&mut store, "clip_1", &config)?;
        load_clip(&mut store, "clip_1", &pipeline.join("text_encoder"))?;
        let first = (tokenizer, first);
        let (config, tokenizer) = read_text_pair(&pipeline.join("text_encoder_2"), &pipeline.join("tokenizer_2"))?;
        let second = ClipTextModel::with_projection(&mut store, Scope::from("clip_2"), &config)?;
        load_clip(&mut store, "clip_2", &pipeline.join("text_encoder_2"))?;
        let second = (tokenizer, second);
        if first.0.max_length() != second.0.max_length() {
            return Err(bad(pipeline, "its two CLIP tokenizers make rows of different lengths"));
        }
        cast_all(&mut store, dtype)?;
        Ok(Self { store, first, second })
    }

    /// Width of the text tokens (the UNet's `cross_attention_dim`).
    pub fn width(&self) -> usize {
        self.first.1.config().hidden_size + self.second.1.config().hidden_size
    }

    /// Tokens per prompt (both tokenizers' `model_max_length`).
    pub fn tokens(&self) -> usize {
        self.first.0.max_length()
    }

    /// Width of the pooled text.
    pub fn pooled_dim(&self) -> usize {
        self.second.1.config().projection_dim
    }

    /// `prompt_embeds` and `pooled_prompt_embeds` of every prompt, with the indices of the
    /// prompts the tokenizers cut to fit.
    pub fn encode(&self, prompts: &[&str]) -> Result<(PromptEmbedding, Vec<usize>)> {
        let (tokens, width, pooled_dim) = (self.first.0.max_length(), self.width(), self.pooled_dim());
        let (d1, d2) = (self.first.1.config().hidden_size, self.second.1.config().hidden_size);
        let mut values = Vec::with_capacity(prompts.len() * tokens * width);
        let mut pooled = Vec::with_capacity(prompts.len() * pooled_dim);
        let mut truncated = Vec::new();
        for (c, chunk) in prompts.chunks(CHUNK).enumerate() {
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let ids = self.first.0.encode(chunk)?;
            truncated.extend(ids.truncated.iter().map(|i| c * CHUNK + i));
            let h1 = B::to_vec(&tape.no_grad(|| self.first.1.forward_penultimate(&p, &ids.ids))?.value)?;
            let ids = self.second.0.encode(chunk)?;
            let out = tape.no_grad(|| self.second.1.forward_projected(&p, &ids.ids))?;
            let h2 = B::to_vec(&out.penultimate.value)?;
            pooled.extend(B::to_vec(&out.pooled.value)?);
            // [k, t, d₁] ‖ [k, t, d₂] → [k, t, d₁ + d₂]
            for (a, b) in h1.chunks(d1).zip(h2.chunks(d2)) {
                values.extend_from_slice(a);
                values.extend_from_slice(b);
            }
        }
        if values.len() != prompts.len() * tokens * width {
            return Err(TrainError::Internal("SDXL's encoders make one row of tokens per prompt"));
        }
        truncated.dedup();
        Ok((PromptEmbedding::TextPooled { values, tokens, dim: width, pooled, pooled_dim }, truncated))
    }

    /// Encodes `prompts` (each once, a chunk at a time) and writes the two tables an SDXL `sd` model reads:
    /// `text_embeddings` (`[tokens, width]` per prompt) and `pooled_text_embeddings` (`[1,
    /// pooled_dim]`), each named by its prompt, each file atomically with `metadata`. Returns
    /// the prompts the tokenizers cut.
    pub fn write_tables(
        &self,
        prompts: &[&str],
        (text_path, pooled_path): (&Path, &Path),
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<String>> {
        let mut cut = Vec::new();
        encode_prompt_tables(prompts, (text_path, Some(pooled_path)), metadata, |chunk| {
            let (embedding, truncated) = self.encode(chunk)?;
            cut.extend(truncated.into_iter().map(|i| chunk[i].to_string()));
            Ok(embedding)
        })?;
        Ok(cut)
    }
}
