//! What a denoiser is conditioned on besides `x_t`.

/// Prompts as the network reads them, made by [`super::DualDenoiser::embed_prompts`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PromptEmbedding {
    /// Class ids: one list per class embedding, each with one id per sample (the toy's
    /// fill and background colours).
    Classes(Vec<Vec<usize>>),
    /// Text-encoder outputs (diffusers' `encoder_hidden_states`), `[n, tokens, dim]`
    /// row-major in `values`.
    Text {
        /// The embeddings.
        values: Vec<f32>,
        /// Tokens per prompt (77 for CLIP).
        tokens: usize,
        /// Width of each token's embedding.
        dim: usize,
    },
    /// Text tokens with one pooled vector per prompt (SD3's `encoder_hidden_states` and
    /// `pooled_projections`).
    TextPooled {
        /// The token embeddings, `[n, tokens, dim]` row-major.
        values: Vec<f32>,
        /// Tokens per prompt.
        tokens: usize,
        /// Width of each token's embedding.
        dim: usize,
        /// The pooled projections, `[n, pooled_dim]` row-major.
        pooled: Vec<f32>,
        /// Width of a pooled projection.
        pooled_dim: usize,
    },
}

impl PromptEmbedding {
    /// How many prompts it holds (None: class ids without any class embedding).
    pub fn batch(&self) -> Option<usize> {
        match self {
            PromptEmbedding::Classes(ids) => ids.first().map(Vec::len),
            PromptEmbedding::Text { values, tokens, dim } | PromptEmbedding::TextPooled { values, tokens, dim, .. } => {
                Some(values.len() / (tokens * dim).max(1))
            }
        }
    }
}

/// The timestep and the prompt of every sample of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    /// Timestep per sample (the DDPM index, or 1000·t for flows).
    pub t: Vec<f32>,
    /// The prompts.
    pub prompt: PromptEmbedding,
}
