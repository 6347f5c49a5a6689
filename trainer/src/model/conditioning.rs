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
}

/// The timestep and the prompt of every sample of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Conditioning {
    /// Timestep per sample (the DDPM index, or 1000·t for flows).
    pub t: Vec<f32>,
    /// The prompts.
    pub prompt: PromptEmbedding,
}
