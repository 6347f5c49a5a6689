//! The T5 tokenizer of SD3 and Flux pipelines (`tokenizer_3/`), through the `tokenizers`
//! crate: `tokenizer.json` (T5's Unigram model with its normaliser) and the end and pad tokens
//! of `tokenizer_config.json`. Every prompt becomes `tokens </s>` padded with `<pad>` to
//! `max_sequence_length`, or cut to fit before the end token, as SD3's pipelines and
//! train_controlnet_sd3.py call it (`padding="max_length"`, `truncation=True`).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Result, TrainError};
use crate::model::sd::TokenIds;
use crate::model::sd::{read_tokenizer_json as read_json, special_token as token_field};
use crate::weights::bad;

/// The tokenizer.
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer").field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

impl T5Tokenizer {
    /// From a pipeline's `tokenizer_3/` folder (`tokenizer.json`; the end and pad tokens from
    /// `tokenizer_config.json` or `special_tokens_map.json`, `</s>` and `<pad>` when absent).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(bad(dir, "holds no tokenizer.json (lisa reads T5 tokenizers from it)"));
        }
        let inner =
            Tokenizer::from_file(&json).map_err(|e| bad(&json, format!("cannot be read as a tokenizer ({e})")))?;
        let config = read_json(&dir.join("tokenizer_config.json")).unwrap_or_default();
        let specials = read_json(&dir.join("special_tokens_map.json")).unwrap_or_default();
        let id = |key: &str, default: &str| -> Result<u32> {
            let content = token_field(specials.get(key))
                .or_else(|| token_field(config.get(key)))
                .unwrap_or_else(|| default.to_string());
            inner.token_to_id(&content).ok_or_else(|| bad(&json, format!("has no token {content:?} ({key})")))
        };
        Ok(Self { eos: id("eos_token", "</s>")?, pad: id("pad_token", "<pad>")?, inner })
    }

    /// One past the largest id it makes.
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `[tokens…, eos, pad…]` rows of `max_length` ids; longer prompts are cut before the end
    /// token (and reported in [`TokenIds::truncated`]).
    pub fn encode(&self, prompts: &[&str], max_length: usize) -> Result<TokenIds> {
        if max_length == 0 {
            return Err(TrainError::Config("max_sequence_length must be >= 1".into()));
        }
        let mut ids = Vec::with_capacity(prompts.len());
        let mut truncated = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let e = self
                .inner
                .encode(*p, false)
                .map_err(|e| TrainError::Mismatch(format!("cannot tokenize prompt {p:?}: {e}")))?;
            let mut row = e.get_ids().to_vec();
            if row.len() > max_length - 1 {
                row.truncate(max_length - 1);
                truncated.push(i);
            }
            row.push(self.eos);
            row.resize(max_length, self.pad);
            ids.push(row);
        }
        Ok(TokenIds { ids, truncated })
    }
}
