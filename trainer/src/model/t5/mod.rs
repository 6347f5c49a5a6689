//! transformers' `T5EncoderModel` (SD3's and Flux's third text encoder, T5 v1.1 XXL) and its
//! tokenizer. Token embeddings (no positions), pre-norm blocks of self-attention with a
//! learned relative-position bias (shared by every block, from block 0) and a gated-GELU
//! feed-forward, RMS norms without mean or bias, a final RMS norm. T5's attention has no
//! `1/√d` score scale (its initialisation absorbs it). Frozen: it runs under no-grad, and the
//! token lookup and the position bias are made on the host.

mod tokenizer;

pub use tokenizer::T5Tokenizer;

use std::path::Path;

use lisa_core::backend::{Backend, BinaryOp, DType, Shape, Transpose, UnaryOp};
use serde_json::{Map, Value};

use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::model::sd::read_transformers_weights;
use crate::nn::{Linear, RmsNorm};
use crate::params::{Bound, Init, ParamId, ParamStore, Scope};
use crate::weights::{bad, load_tensors};

/// The supported keys of a `T5Config`, for its encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// Tokens in the vocabulary (32128).
    pub vocab_size: usize,
    /// Width of the hidden states (4096 in T5-XXL).
    pub d_model: usize,
    /// Width of a head (64).
    pub d_kv: usize,
    /// Width of the feed-forward (10240).
    pub d_ff: usize,
    /// Blocks (24).
    pub num_layers: usize,
    /// Heads (64).
    pub num_heads: usize,
    /// Relative-position buckets (32).
    pub relative_attention_num_buckets: usize,
    /// The distance past which buckets stop growing (128).
    pub relative_attention_max_distance: usize,
    /// ε of every RMS norm (1e-6).
    pub layer_norm_epsilon: f32,
}

impl T5Config {
    /// From a `T5EncoderModel` `config.json`: the keys the encoder computes with. Its
    /// `feed_forward_proj` must be `gated-gelu` (T5 v1.1, what SD3 and Flux use).
    pub fn from_json(c: &Map<String, Value>) -> Result<Self> {
        let count = |key: &str, default: u64, max: u64| -> Result<usize> {
            match c.get(key) {
                None | Some(Value::Null) => Ok(default as usize),
                Some(v) => v.as_u64().filter(|&x| x > 0 && x <= max).map(|x| x as usize).ok_or_else(|| {
                    TrainError::Config(format!("text_encoder_3 config.json: {key} = {v} is not a count in 1..={max}"))
                }),
            }
        };
        let proj = c.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu");
        if proj != "gated-gelu" {
            return Err(TrainError::Config(format!(
                "text_encoder_3 config.json: feed_forward_proj {proj:?} is not supported (gated-gelu, T5 v1.1's)"
            )));
        }
        let eps = c.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-6);
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(TrainError::Config(format!("text_encoder_3 config.json: layer_norm_epsilon {eps} is not > 0")));
        }
        const WIDTH: u64 = 1 << 16;
        Ok(Self {
            vocab_size: count("vocab_size", 32128, 1 << 20)?,
            d_model: count("d_model", 512, WIDTH)?,
            d_kv: count("d_kv", 64, WIDTH)?,
            d_ff: count("d_ff", 2048, 4 * WIDTH)?,
            num_layers: count("num_layers", 6, 256)?,
            num_heads: count("num_heads", 8, 1024)?,
            relative_attention_num_buckets: count("relative_attention_num_buckets", 32, 1024)?,
            relative_attention_max_distance: count("relative_attention_max_distance", 128, 1 << 16)?,
            layer_norm_epsilon: eps as f32,
        })
    }

    fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// transformers' `_relative_position_bucket` for an encoder (bidirectional): half the buckets
/// per direction (keys after the query in the upper half); distances below a quarter of the
/// buckets get one bucket each, longer ones share logarithmically wider buckets up to
/// `max_distance`. The logarithm in f32, as torch computes it.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return bucket + n;
    }
    let scaled =
        (n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln() * (half - max_exact) as f32;
    bucket += (max_exact + scaled as usize).min(half - 1);
    bucket
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

/// The T5 encoder.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    config: T5Config,
    shared: ParamId,
    relative_attention_bias: ParamId,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl T5Encoder {
    /// Parameters under `at` with transformers' names (`shared`, `encoder.block.{i}.…`,
    /// `encoder.final_layer_norm`).
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &T5Config) -> Result<Self> {
        let at = at.into();
        let (d, inner, eps) = (c.d_model, c.inner(), c.layer_norm_epsilon);
        let encoder = at.pp("encoder");
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let b = encoder.pp("block").pp(i);
            let (attn, ff) = (b.pp("layer").pp(0), b.pp("layer").pp(1));
            let sa = attn.pp("SelfAttention");
            let dense = ff.pp("DenseReluDense");
            blocks.push(Block {
                attn_norm: RmsNorm::new(s, attn.pp("layer_norm"), d, eps)?,
                q: Linear::without_bias(s, sa.pp("q"), d, inner)?,
                k: Linear::without_bias(s, sa.pp("k"), d, inner)?,
                v: Linear::without_bias(s, sa.pp("v"), d, inner)?,
                o: Linear::without_bias(s, sa.pp("o"), inner, d)?,
                ff_norm: RmsNorm::new(s, ff.pp("layer_norm"), d, eps)?,
                wi_0: Linear::without_bias(s, dense.pp("wi_0"), d, c.d_ff)?,
                wi_1: Linear::without_bias(s, dense.pp("wi_1"), d, c.d_ff)?,
                wo: Linear::without_bias(s, dense.pp("wo"), c.d_ff, d)?,
            });
        }
        let bias_at = encoder.pp("block").pp(0).pp("layer").pp(0).pp("SelfAttention").pp("relative_attention_bias");
        Ok(Self {
            shared: s.add(at.pp("shared").name("weight"), &[c.vocab_size, d], Init::LecunNormal { fan_in: d })?,
            relative_attention_bias: s.add(
                bias_at.name("weight"),
                &[c.relative_attention_num_buckets, c.num_heads],
                Init::LecunNormal { fan_in: c.num_heads },
            )?,
            blocks,
            final_norm: RmsNorm::new(s, encoder.pp("final_layer_norm"), d, eps)?,
            config: c.clone(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `last_hidden_state [n, t, d_model]` (f32) of token ids `ids` (`n` rows of `t` ids, no
    /// attention mask, as SD3's pipelines call it).
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<Var<B>> {
        let t = p.tape;
        let c = &self.config;
        let (n, len) = (ids.len(), ids.first().map_or(0, Vec::len));
        if n == 0 || len == 0 || ids.iter().any(|r| r.len() != len) {
            return Err(TrainError::Mismatch(format!("token ids: {n} rows of {len}: expected equal, non-empty rows")));
        }
        let (d, heads, dk) = (c.d_model, c.num_heads, c.d_kv);
        // Token embeddings, gathered on the host (a frozen table).
        let table = B::to_vec(&p.p(self.shared).value)?;
        let mut x = Vec::with_capacity(n * len * d);
        for &id in ids.iter().flatten() {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(TrainError::Mismatch(format!(
                    "token id {id} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            x.extend_from_slice(&table[id * d..(id + 1) * d]);
        }
        let shared = &p.p(self.shared).value;
        let (device, dtype) = (B::device(shared), B::dtype(shared));
        let mut h = t.constant(B::from_slice(&x, &Shape::new([n, len, d]), dtype, &device)?);
        // [1, heads, t, t]: bias[h][i][j] = table[bucket(j − i)][h].
        let buckets = B::to_vec(&p.p(self.relative_attention_bias).value)?;
        let mut bias = vec![0.0f32; heads * len * len];
        for i in 0..len {
            for j in 0..len {
                let b = relative_position_bucket(
                    j as i64 - i as i64,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                );
                for head in 0..heads {
                    bias[(head * len + i) * len + j] = buckets[b * heads + head];
                }
            }
        }
        let bias = t.constant(B::from_slice(&bias, &Shape::new([1, heads, len, len]), DType::F32, &device)?);
        let split = |v: &Var<B>| -> Result<Var<B>> {
            // [n, t, heads·dk] → [n, heads, t, dk]
            t.permute(&t.reshape(v, &Shape::new([n, len, heads, dk]))?, &[0, 2, 1, 3])
        };
        for b in &self.blocks {
            let normed = b.attn_norm.forward(p, &h)?;
            let (q, k, v) = (
                split(&b.q.forward(p, &normed)?)?,
                split(&b.k.forward(p, &normed)?)?,
                split(&b.v.forward(p, &normed)?)?,
            );
            // Scores in f32 with the position bias, no 1/√d scale.
            let scores = t.matmul(&q, &k, Transpose { a: false, b: true })?;
            let scores = t.add(&t.cast(&scores, DType::F32)?, &bias)?;
            let weights = t.cast(&t.softmax_last(&scores)?, B::dtype(&v.value))?;
            let ctx = t.matmul(&weights, &v, Transpose::default())?; // [n, heads, t, dk]
            let ctx = t.reshape(&t.permute(&ctx, &[0, 2, 1, 3])?, &Shape::new([n, len, heads * dk]))?;
            h = t.add(&h, &b.o.forward(p, &ctx)?)?;
            let normed = b.ff_norm.forward(p, &h)?;
            let gate = t.unary(UnaryOp::GeluTanh, &b.wi_0.forward(p, &normed)?)?;
            let ff = b.wo.forward(p, &t.binary(BinaryOp::Mul, &gate, &b.wi_1.forward(p, &normed)?)?)?;
            h = t.add(&h, &ff)?;
        }
        t.cast(&self.final_norm.forward(p, &h)?, DType::F32)
    }
}

/// Loads a transformers `T5EncoderModel` folder (`model.safetensors` or its sharded index)
/// into `store` under `at`, all-or-nothing. The tied `encoder.embed_tokens.weight` is
/// skipped when `shared.weight` is there, and stands for it when it is not.
pub fn load_t5<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, dir: &Path) -> Result<usize> {
    let at = at.into();
    let (file, mut tensors) = read_transformers_weights(dir)?;
    const TIED: &str = "encoder.embed_tokens.weight";
    match (tensors.contains_key("shared.weight"), tensors.remove(TIED)) {
        (false, Some(t)) => {
            tensors.insert("shared.weight".into(), t);
        }
        (false, None) => return Err(bad(&file, "holds neither shared.weight nor encoder.embed_tokens.weight")),
        _ => {}
    }
    let tensors = tensors.into_iter().map(|(k, v)| (at.name(&k), v)).collect();
    load_tensors(store, &file, tensors, |n| at.contains(n), |_| false)
}

/// The T5 encoder folder `dir` with its tokenizer folder `tokenizer`, built under `at` and
/// loaded: a flow transformer's text encoder. The tokenizer's ids must fit the encoder's
/// vocabulary, and its width must be `width` (the transformer's `joint_attention_dim`);
/// errors name the folder.
pub fn open_t5<B: Backend>(
    store: &mut ParamStore<B>,
    at: impl Into<Scope>,
    (dir, tokenizer): (&Path, &Path),
    width: usize,
) -> Result<(T5Tokenizer, T5Encoder)> {
    let at = at.into();
    let config = T5Config::from_json(&crate::model::sd::read_json_config(dir)?)?;
    let tokens = T5Tokenizer::from_dir(tokenizer)?;
    if tokens.id_bound() > config.vocab_size {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        return Err(bad(
            tokenizer,
            format!("makes token ids up to {}; {name} embeds {}", tokens.id_bound() - 1, config.vocab_size),
        ));
    }
    if config.d_model != width {
        return Err(bad(
            dir,
            format!("is {} wide; the transformer reads {width} (joint_attention_dim)", config.d_model),
        ));
    }
    let model = T5Encoder::new(store, &at, &config)?;
    load_t5(store, &at, dir)?;
    Ok((tokens, model))
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket as bucket;

    /// transformers' buckets for 32 buckets, max distance 128 (T5's defaults), at a few
    /// distances: exact below 8, logarithmic after, capped at 15; keys after the query
    /// from 16 on.
    #[test]
    fn buckets_match_transformers() {
        let cases = [(0, 0), (-1, 1), (-7, 7), (-8, 8), (-12, 9), (-20, 10), (-50, 13), (-127, 15), (-500, 15)];
        for (rel, want) in cases {
            assert_eq!(bucket(rel, 32, 128), want, "relative {rel}");
            if rel != 0 {
                assert_eq!(bucket(-rel, 32, 128), want + 16, "relative {}", -rel);
            }
        }
    }
}
