//! Precomputed text embeddings: what the frozen text encoder made of each prompt, read
//! from a safetensors file whose tensor names are the prompts (`""`: the null prompt of
//! classifier-free guidance and of prompt dropout), each `[tokens, dim]`. The stand-in for
//! the CLIP text encoder until it is loaded itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::weights::{bad, digest, io, parse_safetensors};

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
