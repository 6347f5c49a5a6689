//! The CLIP tokenizer of SD pipelines, through the `tokenizers` crate: read from the folder's
//! `tokenizer.json`, or built from `vocab.json` + `merges.txt` (what older SD repositories
//! ship) with the settings transformers gives CLIP (NFC, whitespace collapsed, lower case;
//! CLIP's split pattern, byte-level; BPE with the `</w>` end-of-word suffix). Every prompt
//! becomes `<|startoftext|> tokens <|endoftext|>` padded to `model_max_length` (77), or
//! truncated to it, as diffusers' training scripts do.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Result, TrainError};
use crate::weights::bad;

/// CLIP's pre-tokenisation pattern (transformers' `CLIPConverter`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The start token.
const BOS: &str = "<|startoftext|>";
/// The end token.
const EOS: &str = "<|endoftext|>";

/// Token ids of a batch of prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// One row of `model_max_length` ids per prompt.
    pub ids: Vec<Vec<u32>>,
    /// The prompts that were cut to fit (their index).
    pub truncated: Vec<usize>,
}

/// The tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("bos", &self.bos).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

fn tk_err(dir: &Path) -> impl Fn(tokenizers::Error) -> TrainError + '_ {
    move |e| bad(dir, format!("cannot build the tokenizer ({e})"))
}

/// A special token's content in `tokenizer_config.json` / `special_tokens_map.json`: a
/// string, or an object with `content`.
pub(crate) fn token_field(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

pub(crate) fn read_json(path: &Path) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_str(&std::fs::read_to_string(path).ok()?) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

impl ClipTokenizer {
    /// One more than the largest token id it can produce (special tokens included).
    pub fn id_bound(&self) -> usize {
        self.inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
    }

    /// From a pipeline's `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(bad(dir, "no such tokenizer folder"));
        }
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| bad(&json, format!("cannot be read as a tokenizer ({e})")))?
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            if !vocab.is_file() || !merges.is_file() {
                return Err(bad(dir, "holds neither tokenizer.json nor vocab.json + merges.txt"));
            }
            Self::build(dir, &vocab, &merges)?
        };
        let config = read_json(&dir.join("tokenizer_config.json")).unwrap_or_default();
        let specials = read_json(&dir.join("special_tokens_map.json")).unwrap_or_default();
        let special = |key: &str, default: &str| -> String {
            token_field(specials.get(key))
                .or_else(|| token_field(config.get(key)))
                .unwrap_or_else(|| default.to_string())
        };
        let (bos_s, eos_s, pad_s) = (special("bos_token", BOS), special("eos_token", EOS), special("pad_token", EOS));
        if !json.is_file() {
            // Special tokens are matched whole in the text, as transformers does: against the
            // normalised (lower-cased) text when every declaration of the token says
            // `"normalized": true`, else exactly.
            let declarations: Vec<(String, bool)> = ["bos_token", "eos_token", "pad_token", "unk_token"]
                .iter()
                .flat_map(|k| [specials.get(*k), config.get(*k)])
                .flatten()
                .filter_map(|v| {
                    let content = token_field(Some(v))?;
                    let normalized = v.get("normalized").and_then(Value::as_bool).unwrap_or(false);
                    Some((content, normalized))
                })
                .collect();
            let mut tokens: Vec<AddedToken> = Vec::new();
            for content in [&bos_s, &eos_s, &pad_s] {
                if tokens.iter().any(|t| &t.content == content) {
                    continue;
                }
                let mut flags = declarations.iter().filter(|(c, _)| c == content).map(|(_, n)| *n);
                let normalized = flags.next().is_some_and(|first| first && flags.all(|n| n));
                tokens.push(AddedToken::from(content.clone(), true).normalized(normalized));
            }
            inner.add_special_tokens(&tokens);
        }
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| bad(dir, format!("the vocabulary has no token {t:?}")));
        let (bos, eos, pad) = (id(&bos_s)?, id(&eos_s)?, id(&pad_s)?);
        let max_length =
            config.get("model_max_length").and_then(Value::as_u64).filter(|&m| (2..=4096).contains(&m)).unwrap_or(77)
                as usize;
        Ok(Self { inner, bos, eos, pad, max_length })
    }

    /// transformers' CLIP tokenizer from the vocabulary and merges files.
    fn build(dir: &Path, vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
        let bpe = BPE::from_file(&v, &m)
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .build()
            .map_err(|e| bad(dir, format!("cannot read vocab.json + merges.txt ({e})")))?;
        let mut t = Tokenizer::new(bpe);
        let spaces = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(tk_err(dir))?;
        t.with_normalizer(Some(NormSeq::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(spaces),
            NormalizerWrapper::Lowercase(Lowercase),
        ])));
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(tk_err(dir))?;
        t.with_pre_tokenizer(Some(PreSeq::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        Ok(t)
    }

    /// The row length (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `[bos, tokens…, eos, pad…]` rows of `max_length` ids; longer prompts are cut before
    /// the end token (and reported in [`Encoded::truncated`]).
    pub fn encode(&self, prompts: &[&str]) -> Result<Encoded> {
        let mut ids = Vec::with_capacity(prompts.len());
        let mut truncated = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let e = self
                .inner
                .encode(*p, false)
                .map_err(|e| TrainError::Mismatch(format!("cannot tokenize prompt {p:?}: {e}")))?;
            let mut tokens = e.get_ids().to_vec();
            if tokens.len() > self.max_length - 2 {
                tokens.truncate(self.max_length - 2);
                truncated.push(i);
            }
            let mut row = Vec::with_capacity(self.max_length);
            row.push(self.bos);
            row.extend(tokens);
            row.push(self.eos);
            row.resize(self.max_length, self.pad);
            ids.push(row);
        }
        Ok(Encoded { ids, truncated })
    }
}
