//! SD3's text side, as `StableDiffusion3Pipeline.encode_prompt` (and train_controlnet_sd3.py)
//! computes it: two `CLIPTextModelWithProjection` (`text_encoder/`, `text_encoder_2/`, each
//! with its CLIP tokenizer) give their penultimate hidden states and projected pooled outputs;
//! `T5EncoderModel` (`text_encoder_3/` with `tokenizer_3/`) gives `max_sequence_length` more
//! tokens. `prompt_embeds = [clip_1 ‖ clip_2 ‖ 0…] (77 tokens, padded to T5's width) followed by
//! T5's tokens`; `pooled_prompt_embeds = pooled_1 ‖ pooled_2`. Without `text_encoder_3` the T5
//! tokens are zeros, as diffusers makes them. All frozen, run without recording.

use std::collections::BTreeMap;
use std::path::Path;

use lisa_core::backend::{Backend, DType};

use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::model::PromptEmbedding;
use crate::model::sd::{ClipTextModel, ClipTokenizer, read_text_pair};
use crate::model::t5::{T5Encoder, T5Tokenizer, open_t5};
use crate::params::{ParamStore, Scope};
use crate::weights::bad;

/// The most prompts one encoder pass holds.
const CHUNK: usize = 8;

/// The three text encoders of an SD3 pipeline folder with their tokenizers.
pub struct Sd3TextEncoders<B: Backend> {
    store: ParamStore<B>,
    clips: Vec<(ClipTokenizer, ClipTextModel)>,
    t5: Option<(T5Tokenizer, T5Encoder)>,
    max_sequence_length: usize,
    /// T5's width: the transformer's `joint_attention_dim`.
    width: usize,
}

impl<B: Backend> Sd3TextEncoders<B> {
    /// From an SD3 pipeline folder's `text_encoder*/` and `tokenizer*/` folders, weights
    /// stored as `dtype`, for a transformer of `joint_attention_dim`; T5 reads
    /// `max_sequence_length` tokens (diffusers' default 256 in the pipeline, 77 in
    /// train_controlnet_sd3.py). Mismatched pairs and widths are errors naming the folder.
    pub fn open(
        pipeline: &Path,
        device: B::Device,
        dtype: DType,
        max_sequence_length: usize,
        joint_attention_dim: usize,
    ) -> Result<Self> {
        if max_sequence_length == 0 || max_sequence_length > 1 << 14 {
            return Err(TrainError::Config(format!("max_sequence_length {max_sequence_length} must lie in 1..=16384")));
        }
        let mut store = ParamStore::new(device, 0).freeze_prefix("");
        let mut clips = Vec::new();
        for (i, (te, tok)) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")].into_iter().enumerate()
        {
            let dir = pipeline.join(te);
            let (config, tokenizer) = read_text_pair(&dir, &pipeline.join(tok))?;
            let at = Scope::from(format!("clip_{}", i + 1).as_str());
            let model = ClipTextModel::with_projection(&mut store, &at, &config)?;
            crate::model::sd::load_clip(&mut store, &at, &dir)?;
            clips.push((tokenizer, model));
        }
        if clips[0].0.max_length() != clips[1].0.max_length() {
            return Err(bad(pipeline, "its two CLIP tokenizers make rows of different lengths"));
        }
        let clip_width: usize = clips.iter().map(|(_, m)| m.config().hidden_size).sum();
        if clip_width > joint_attention_dim {
            return Err(bad(
                pipeline,
                format!(
                    "its CLIPs are {clip_width} wide together, wider than the transformer's joint_attention_dim {joint_attention_dim}"
                ),
            ));
        }
        let t5_dir = pipeline.join("text_encoder_3");
        let t5 = match t5_dir.is_dir() {
            true => Some(open_t5(&mut store, "t5", (&t5_dir, &pipeline.join("tokenizer_3")), joint_attention_dim)?),
            false => None,
        };
        crate::model::sd::cast_frozen(&mut store, dtype)?;
        Ok(Self { store, clips, t5, max_sequence_length, width: joint_attention_dim })
    }

    /// Tokens per prompt: the CLIPs' 77 and T5's `max_sequence_length`.
    pub fn tokens(&self) -> usize {
        self.clips[0].0.max_length() + self.max_sequence_length
    }

    /// Width of the pooled projections (the CLIPs' `projection_dim` together).
    pub fn pooled_dim(&self) -> usize {
        self.clips.iter().map(|(_, m)| m.config().projection_dim).sum()
    }

    /// `prompt_embeds` and `pooled_prompt_embeds` of every prompt.
    pub fn encode(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        let (tokens, width, pooled_dim) = (self.tokens(), self.width, self.pooled_dim());
        let clip_len = self.clips[0].0.max_length();
        let mut values = Vec::with_capacity(prompts.len() * tokens * width);
        let mut pooled = Vec::with_capacity(prompts.len() * pooled_dim);
        for chunk in prompts.chunks(CHUNK) {
            let k = chunk.len();
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let mut hidden = Vec::new(); // per CLIP: ([k, 77, d_i], d_i)
            let mut pools = Vec::new(); // per CLIP: ([k, proj_i], proj_i)
            for (tokenizer, model) in &self.clips {
                let ids = tokenizer.encode(chunk)?;
                let out = tape.no_grad(|| model.forward_projected(&p, &ids.ids))?;
                hidden.push((B::to_vec(&out.penultimate.value)?, model.config().hidden_size));
                pools.push((B::to_vec(&out.pooled.value)?, model.config().projection_dim));
            }
            let t5 = match &self.t5 {
                Some((tokenizer, model)) => {
                    let ids = tokenizer.encode(chunk, self.max_sequence_length)?;
                    B::to_vec(&tape.no_grad(|| model.forward(&p, &ids.ids))?.value)?
                }
                None => vec![0.0; k * self.max_sequence_length * width],
            };
            for i in 0..k {
                for j in 0..clip_len {
                    let start = values.len();
                    for (h, d) in &hidden {
                        values.extend_from_slice(&h[(i * clip_len + j) * d..(i * clip_len + j + 1) * d]);
                    }
                    values.resize(start + width, 0.0);
                }
                let per = self.max_sequence_length * width;
                values.extend_from_slice(&t5[i * per..(i + 1) * per]);
                for (v, d) in &pools {
                    pooled.extend_from_slice(&v[i * d..(i + 1) * d]);
                }
            }
        }
        Ok(PromptEmbedding::TextPooled { values, tokens, dim: width, pooled, pooled_dim })
    }

    /// Encodes `prompts` once, a chunk at a time, and writes the two tables an `sd3` model reads
    /// (`text_embeddings`: `[tokens, width]` per prompt; `pooled_text_embeddings`: `[1,
    /// pooled_dim]`), each named by its prompt, each file atomically with `metadata`: T5 need
    /// not be in memory while training.
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
