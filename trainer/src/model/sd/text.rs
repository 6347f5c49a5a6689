//! Precomputed text embeddings: what the frozen text encoder made of each prompt, read
//! from a safetensors file whose tensor names are the prompts (`""`: the null prompt of
//! classifier-free guidance and of prompt dropout), each `[tokens, dim]`. The stand-in for
//! the CLIP text encoder until it is loaded itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lisa_core::backend::Shape;

use crate::error::{Result, TrainError};
use crate::model::PromptEmbedding;
use crate::weights::{bad, digest, host_to_safetensors, io, parse_safetensors, write_atomic};

/// The prompts' embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTable {
    /// Where they were read from.
    pub path: PathBuf,
    /// Tokens per prompt (77 for CLIP).
    pub tokens: usize,
    /// Width of a token's embedding (the UNet's `cross_attention_dim`).
    pub dim: usize,
    /// The file's sha256 (checkpoints record what the model was trained with).
    pub digest: String,
    table: BTreeMap<String, Vec<f32>>,
}

impl PromptTable {
    /// Reads `path`; every tensor must be `[tokens, dim]` with one shape for all and
    /// `dim = cross_attention_dim`, finite.
    pub fn read(path: &Path, cross_attention_dim: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let file = parse_safetensors(path, &bytes)?;
        let mut shape = None;
        let mut table = BTreeMap::new();
        for (prompt, (s, values)) in file.tensors {
            let dims: [usize; 2] = s.dims().try_into().map_err(|_| {
                bad(path, format!("the embedding of prompt {prompt:?} has shape {s}, expected [tokens, dim]"))
            })?;
            if dims[1] != cross_attention_dim || dims[0] == 0 {
                return Err(bad(
                    path,
                    format!(
                        "the embedding of prompt {prompt:?} is {s}; the UNet reads [tokens, {cross_attention_dim}]"
                    ),
                ));
            }
            if *shape.get_or_insert(dims) != dims {
                return Err(bad(path, format!("prompt {prompt:?} has {s}; the others {:?}", shape.unwrap_or(dims))));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad(path, format!("the embedding of prompt {prompt:?} holds NaN or infinite values")));
            }
            table.insert(prompt, values);
        }
        let [tokens, dim] = shape.ok_or_else(|| bad(path, "holds no prompt embeddings"))?;
        Ok(Self { path: path.to_path_buf(), tokens, dim, digest: digest(&bytes), table })
    }

    /// Checks this table's digest against the one a model was described with (`recorded`,
    /// when there is one) and records it: a checkpoint names its embeddings by content.
    pub fn pin(&self, recorded: &mut Option<String>) -> Result<()> {
        if let Some(want) = recorded.as_ref()
            && *want != self.digest
        {
            return Err(bad(
                &self.path,
                format!("its SHA-256 is {}, not the {want} the model was described with", self.digest),
            ));
        }
        *recorded = Some(self.digest.clone());
        Ok(())
    }

    /// The embeddings of `prompts`, `[n, tokens, dim]` row-major; a prompt the file lacks is
    /// an error naming it.
    pub fn lookup(&self, prompts: &[&str]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(prompts.len() * self.tokens * self.dim);
        for p in prompts {
            let e = self.table.get(*p).ok_or_else(|| {
                TrainError::Mismatch(format!(
                    "prompt {p:?} has no embedding in {}{}",
                    self.path.display(),
                    if p.is_empty() { " (the null prompt: its tensor is named \"\")" } else { "" }
                ))
            })?;
            out.extend_from_slice(e);
        }
        Ok(out)
    }
}

/// Writes the prompt tables of `embedding`, the encoding of `prompts` (one row each): the text
/// tokens, one `[tokens, dim]` tensor per prompt, to `text`; and for pooled text, one
/// `[1, pooled_dim]` tensor per prompt to `pooled`. Tensors are named by their prompt; each
/// file is written atomically with `metadata`. The tables [`PromptTable::read`] reads.
pub fn write_prompt_tables(
    prompts: &[&str],
    embedding: &PromptEmbedding,
    (text, pooled): (&Path, Option<&Path>),
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let (values, tokens, dim, pools) = match embedding {
        PromptEmbedding::Text { values, tokens, dim } => (values, *tokens, *dim, None),
        PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } => {
            (values, *tokens, *dim, Some((pooled, *pooled_dim)))
        }
        _ => return Err(TrainError::Internal("prompt tables hold text embeddings")),
    };
    let per = tokens * dim;
    if values.len() != prompts.len() * per {
        return Err(TrainError::Internal("one text embedding per prompt"));
    }
    let rows: Vec<(String, Shape, &[f32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.to_string(), Shape::new([tokens, dim]), &values[i * per..(i + 1) * per]))
        .collect();
    write_atomic(text, &host_to_safetensors(&rows, metadata.clone())?)?;
    match (pools, pooled) {
        (Some((pools, d)), Some(path)) => {
            let rows: Vec<(String, Shape, &[f32])> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| (p.to_string(), Shape::new([1, d]), &pools[i * d..(i + 1) * d]))
                .collect();
            write_atomic(path, &host_to_safetensors(&rows, metadata.clone())?)
        }
        (None, None) => Ok(()),
        _ => Err(TrainError::Internal("a pooled table is written exactly for pooled text")),
    }
}
