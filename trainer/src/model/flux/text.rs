//! Flux's text side, as `FluxPipeline.encode_prompt` (and train_controlnet_flux.py) computes
//! it: `CLIPTextModel` (`text_encoder/` with `tokenizer/`) gives the pooled text (its
//! `pooler_output`: the final-normed state at the end token, no projection; 768 wide in
//! Flux), and `T5EncoderModel` (`text_encoder_2/` with `tokenizer_2/`) gives
//! `max_sequence_length` text tokens (4096 wide). Both frozen, run without recording.

use std::collections::BTreeMap;
use std::path::Path;

use lisa_core::backend::{Backend, DType};

use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::model::PromptEmbedding;
use crate::model::sd::{ClipTextModel, ClipTokenizer, read_text_pair};
use crate::model::t5::{T5Encoder, T5Tokenizer, open_t5};
use crate::params::ParamStore;
use crate::weights::bad;

/// The most prompts one encoder pass holds.
const CHUNK: usize = 8;

/// The two text encoders of a Flux pipeline folder with their tokenizers.
pub struct FluxTextEncoders<B: Backend> {
    store: ParamStore<B>,
    clip: (ClipTokenizer, ClipTextModel),
    t5: (T5Tokenizer, T5Encoder),
    max_sequence_length: usize,
}

impl<B: Backend> FluxTextEncoders<B> {
    /// From a Flux pipeline folder's `text_encoder{,_2}/` and `tokenizer{,_2}/`, weights stored
    /// as `dtype`, for a transformer reading T5 tokens `joint_attention_dim` wide and pooled
    /// text `pooled_projection_dim` wide; T5 reads `max_sequence_length` tokens (diffusers'
    /// pipeline default 512). Mismatched pairs and widths are errors naming the folder.
    pub fn open(
        pipeline: &Path,
        device: B::Device,
        dtype: DType,
        max_sequence_length: usize,
        (joint_attention_dim, pooled_projection_dim): (usize, usize),
    ) -> Result<Self> {
        if max_sequence_length == 0 || max_sequence_length > 1 << 14 {
            return Err(TrainError::Config(format!("max_sequence_length {max_sequence_length} must lie in 1..=16384")));
        }
        let mut store = ParamStore::new(device, 0).freeze_prefix("");
        let clip_dir = pipeline.join("text_encoder");
        let (config, tokenizer) = read_text_pair(&clip_dir, &pipeline.join("tokenizer"))?;
        if config.hidden_size != pooled_projection_dim {
            return Err(bad(
                &clip_dir,
                format!(
                    "is {} wide; the transformer reads pooled text of {pooled_projection_dim} (pooled_projection_dim)",
                    config.hidden_size
                ),
            ));
        }
        let model = ClipTextModel::new(&mut store, "clip", &config)?;
        crate::model::sd::load_clip(&mut store, "clip", &clip_dir)?;
        let clip = (tokenizer, model);
        let t5_dirs = (pipeline.join("text_encoder_2"), pipeline.join("tokenizer_2"));
        let t5 = open_t5(&mut store, "t5", (&t5_dirs.0, &t5_dirs.1), joint_attention_dim)?;
        crate::model::sd::cast_frozen(&mut store, dtype)?;
        Ok(Self { store, clip, t5, max_sequence_length })
    }

    /// Text tokens per prompt (`max_sequence_length`).
    pub fn tokens(&self) -> usize {
        self.max_sequence_length
    }

    /// `prompt_embeds` (T5) and `pooled_prompt_embeds` (CLIP) of every prompt.
    pub fn encode(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        let (tokens, dim) = (self.max_sequence_length, self.t5.1.config().d_model);
        let pooled_dim = self.clip.1.config().hidden_size;
        let mut values = Vec::with_capacity(prompts.len() * tokens * dim);
        let mut pooled = Vec::with_capacity(prompts.len() * pooled_dim);
        for chunk in prompts.chunks(CHUNK) {
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let ids = self.clip.0.encode(chunk)?;
            pooled.extend(B::to_vec(&tape.no_grad(|| self.clip.1.forward_pooled(&p, &ids.ids))?.value)?);
            let ids = self.t5.0.encode(chunk, self.max_sequence_length)?;
            values.extend(B::to_vec(&tape.no_grad(|| self.t5.1.forward(&p, &ids.ids))?.value)?);
        }
        if values.len() != prompts.len() * tokens * dim || pooled.len() != prompts.len() * pooled_dim {
            return Err(TrainError::Internal("Flux's encoders make one row of tokens and one pooled row per prompt"));
        }
        Ok(PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim })
    }

    /// Encodes `prompts` once, a chunk at a time, and writes the two tables a `flux` model reads
    /// (`text_embeddings`: `[tokens, joint_attention_dim]` per prompt;
    /// `pooled_text_embeddings`: `[1, pooled_projection_dim]`), each named by its prompt, each
    /// file atomically with `metadata`: T5 need not be in memory while training.
    pub fn write_tables(
        &self,
        prompts: &[&str],
        (text_path, pooled_path): (&Path, &Path),
        metadata: &BTreeMap<String, String>,
    ) -> Result<()> {
        crate::model::sd::encode_prompt_tables(prompts, (text_path, Some(pooled_path)), metadata, |chunk| {
            self.encode(chunk)
        })
    }
}
