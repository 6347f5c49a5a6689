//! Precomputed text embeddings: what the frozen text encoder made of each prompt, read
//! from a safetensors file whose tensor names are the prompts (`""`: the null prompt of
//! classifier-free guidance and of prompt dropout), each `[tokens, dim]`. The stand-in for
//! the CLIP text encoder until it is loaded itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, TrainError};
use crate::model::PromptEmbedding;
use crate::tensor_file::{TensorFile, TensorFileWriter};
use crate::weights::bad;

/// The prompts' embeddings, read from the file as they are looked up (memory: one batch's,
/// whatever the number of prompts).
#[derive(Debug, Clone)]
pub struct PromptTable {
    /// Where they were read from.
    pub path: PathBuf,
    /// Tokens per prompt (77 for CLIP).
    pub tokens: usize,
    /// Width of a token's embedding (the UNet's `cross_attention_dim`).
    pub dim: usize,
    /// The file's sha256 (checkpoints record what the model was trained with).
    pub digest: String,
    file: Arc<TensorFile>,
}

impl PartialEq for PromptTable {
    /// The same file with the same contents.
    fn eq(&self, other: &Self) -> bool {
        (&self.path, self.tokens, self.dim, &self.digest) == (&other.path, other.tokens, other.dim, &other.digest)
    }
}

impl PromptTable {
    /// Reads `path`'s header and checks every tensor: each must be `[tokens, dim]` with one
    /// shape for all and `dim = cross_attention_dim` (the header says), finite (read one at a
    /// time, in the pass that hashes the file).
    pub fn read(path: &Path, cross_attention_dim: usize) -> Result<Self> {
        let file = TensorFile::open(path)?;
        let mut shape = None;
        for prompt in file.names() {
            let s = file.shape(prompt).unwrap_or_default();
            let dims: [usize; 2] = s.try_into().map_err(|_| {
                bad(path, format!("the embedding of prompt {prompt:?} has shape {s:?}, expected [tokens, dim]"))
            })?;
            if dims[1] != cross_attention_dim || dims[0] == 0 {
                return Err(bad(
                    path,
                    format!(
                        "the embedding of prompt {prompt:?} is {s:?}; the UNet reads [tokens, {cross_attention_dim}]"
                    ),
                ));
            }
            if *shape.get_or_insert(dims) != dims {
                return Err(bad(path, format!("prompt {prompt:?} has {s:?}; the others {:?}", shape.unwrap_or(dims))));
            }
        }
        let [tokens, dim] = shape.ok_or_else(|| bad(path, "holds no prompt embeddings"))?;
        // The values are checked in the one read that hashes the file.
        let digest = file.digest_visiting(|prompt, values| match values.iter().all(|v| v.is_finite()) {
            true => Ok(()),
            false => Err(bad(path, format!("the embedding of prompt {prompt:?} holds NaN or infinite values"))),
        })?;
        Ok(Self { path: path.to_path_buf(), tokens, dim, digest, file: Arc::new(file) })
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
            out.extend_from_slice(&self.file.read(p)?.ok_or_else(|| self.missing(p))?);
        }
        Ok(out)
    }

    /// Checks that the file has an embedding for every one of `prompts` (the error
    /// [`lookup`](Self::lookup) would give), reading none: its header names them.
    pub fn check(&self, prompts: &[&str]) -> Result<()> {
        match prompts.iter().find(|p| self.file.shape(p).is_none()) {
            Some(p) => Err(self.missing(p)),
            None => Ok(()),
        }
    }

    fn missing(&self, prompt: &str) -> TrainError {
        TrainError::Mismatch(format!(
            "prompt {prompt:?} has no embedding in {}{}",
            self.path.display(),
            if prompt.is_empty() { " (the null prompt: its tensor is named \"\")" } else { "" }
        ))
    }
}

/// Prompts encoded per call while tables are written: memory stays bounded (T5's 512 × 4096
/// per prompt makes 32 prompts 270 MB) whatever the number of prompts; a multiple of the
/// encoders' own chunks.
const TABLE_CHUNK: usize = 32;

/// Encodes each of `prompts` once (sorted, repeats dropped) through `encode`, a chunk of 32
/// prompts at a time, and writes the tables [`PromptTable::read`] reads as the rows come: the
/// text tokens, one `[tokens, dim]` tensor per prompt, to `text`; for pooled text, one `[1,
/// pooled_dim]` tensor per prompt to `pooled`. Tensors are named by their prompt; each file is
/// written atomically with `metadata`. Only one chunk's embeddings are in memory, whatever the
/// number of prompts.
pub fn encode_prompt_tables(
    prompts: &[&str],
    paths: (&Path, Option<&Path>),
    metadata: &BTreeMap<String, String>,
    mut encode: impl FnMut(&[&str]) -> Result<PromptEmbedding>,
) -> Result<()> {
    let unique: Vec<&str> = prompts.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut tables = PromptTableWriter::new(&unique, paths, metadata);
    for chunk in unique.chunks(TABLE_CHUNK) {
        tables.push(&encode(chunk)?)?;
    }
    tables.finish()
}

/// The tables [`encode_prompt_tables`] writes, a chunk of prompts' rows at a time.
struct PromptTableWriter {
    prompts: Vec<String>,
    paths: (PathBuf, Option<PathBuf>),
    metadata: BTreeMap<String, String>,
    /// The text and pooled files, started at the first rows (which give the shapes).
    files: Option<(TensorFileWriter, Option<TensorFileWriter>)>,
    /// Rows written so far.
    done: usize,
}

impl PromptTableWriter {
    /// Tables for `prompts` (their rows to come in this order) at `text` and, for pooled text,
    /// `pooled`, with `metadata`.
    fn new(prompts: &[&str], (text, pooled): (&Path, Option<&Path>), metadata: &BTreeMap<String, String>) -> Self {
        Self {
            prompts: prompts.iter().map(|p| p.to_string()).collect(),
            paths: (text.to_path_buf(), pooled.map(Path::to_path_buf)),
            metadata: metadata.clone(),
            files: None,
            done: 0,
        }
    }

    /// Writes the rows of the next prompts (`embedding` encodes them, in order).
    fn push(&mut self, embedding: &PromptEmbedding) -> Result<()> {
        let (values, tokens, dim, pools) = match embedding {
            PromptEmbedding::Text { values, tokens, dim } => (values, *tokens, *dim, None),
            PromptEmbedding::TextPooled { values, tokens, dim, pooled, pooled_dim } => {
                (values, *tokens, *dim, Some((pooled, *pooled_dim)))
            }
            _ => return Err(TrainError::Internal("prompt tables hold text embeddings")),
        };
        let per = tokens * dim;
        let n = values.len().checked_div(per).unwrap_or(0);
        if per == 0 || values.len() != n * per || self.done + n > self.prompts.len() {
            return Err(TrainError::Internal("one text embedding per prompt"));
        }
        if pools.is_some_and(|(p, d)| p.len() != n * d) {
            return Err(TrainError::Internal("one pooled embedding per prompt"));
        }
        if self.files.is_none() {
            let names = |shape: [usize; 2]| -> Vec<(String, Vec<usize>)> {
                self.prompts.iter().map(|p| (p.clone(), shape.to_vec())).collect()
            };
            let text = TensorFileWriter::create(&self.paths.0, &names([tokens, dim]), &self.metadata)?;
            let pooled = match (pools, &self.paths.1) {
                (Some((_, d)), Some(path)) => Some(TensorFileWriter::create(path, &names([1, d]), &self.metadata)?),
                (None, None) => None,
                _ => return Err(TrainError::Internal("a pooled table is written exactly for pooled text")),
            };
            self.files = Some((text, pooled));
        }
        let (text, pooled) = self.files.as_mut().ok_or(TrainError::Internal("prompt table files"))?;
        for row in values.chunks_exact(per) {
            text.push(row)?;
        }
        if let (Some(file), Some((pools, d))) = (pooled, pools) {
            for row in pools.chunks_exact(d) {
                file.push(row)?;
            }
        }
        self.done += n;
        Ok(())
    }

    /// Checks that every prompt's rows came, and puts the files in place.
    fn finish(self) -> Result<()> {
        let (text, pooled) = self.files.ok_or(TrainError::Internal("prompt tables without prompts"))?;
        text.finish()?;
        pooled.map_or(Ok(()), TensorFileWriter::finish)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prompts over several chunks are encoded once each (repeats dropped), in sorted order,
    /// and every prompt reads back its own rows, pooled ones too.
    #[test]
    fn tables_written_chunk_by_chunk_read_back_every_prompt() {
        let dir = std::env::temp_dir().join(format!("lisa-prompt-tables-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let names: Vec<String> = (0..2 * TABLE_CHUNK + 5).map(|i| format!("prompt {i}")).collect();
        let mut prompts: Vec<&str> = names.iter().map(String::as_str).collect();
        prompts.extend(["prompt 3", ""]);
        let (text, pooled) = (dir.join("text.safetensors"), dir.join("pooled.safetensors"));
        // Each prompt's rows are its length and first byte, repeated.
        let row = |p: &str, width: usize| vec![p.len() as f32 + p.bytes().next().unwrap_or(0) as f32 / 256.0; width];
        let mut calls = Vec::new();
        encode_prompt_tables(&prompts, (&text, Some(&pooled)), &BTreeMap::new(), |chunk| {
            calls.push(chunk.len());
            Ok(PromptEmbedding::TextPooled {
                values: chunk.iter().flat_map(|p| row(p, 3 * 4)).collect(),
                tokens: 3,
                dim: 4,
                pooled: chunk.iter().flat_map(|p| row(p, 2)).collect(),
                pooled_dim: 2,
            })
        })
        .unwrap();
        assert_eq!(calls, vec![TABLE_CHUNK, TABLE_CHUNK, 6], "70 distinct prompts, each once");
        let (text, pooled) = (PromptTable::read(&text, 4).unwrap(), PromptTable::read(&pooled, 2).unwrap());
        assert_eq!((text.tokens, text.dim, pooled.tokens, pooled.dim), (3, 4, 1, 2));
        for p in ["prompt 0", "prompt 3", "prompt 68", ""] {
            assert_eq!(text.lookup(&[p]).unwrap(), row(p, 12), "{p:?}");
            assert_eq!(pooled.lookup(&[p]).unwrap(), row(p, 2), "{p:?}");
        }
        assert!(text.lookup(&["never written"]).is_err());
        // A NaN anywhere in a table is named when it is read.
        let mut bytes = std::fs::read(&text.path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let at = 8 + header_len + header["prompt 68"]["data_offsets"][0].as_u64().unwrap() as usize + 4;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&text.path, &bytes).unwrap();
        let err = PromptTable::read(&text.path, 4).unwrap_err().to_string();
        assert!(err.contains("the embedding of prompt \"prompt 68\" holds NaN or infinite values"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
