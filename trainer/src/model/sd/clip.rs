//! transformers' `CLIPTextModel`: the text encoder of SD 1.x/2.x. Token and position
//! embeddings, pre-norm transformer layers with causal self-attention and a `quick_gelu` or
//! `gelu` MLP, a final layer norm; its `last_hidden_state` is the UNet's
//! `encoder_hidden_states`. Frozen: it runs under no-grad, and the token lookup happens on
//! the host.
//!
//! `CLIPTextModelWithProjection` (SD3's two CLIPs) adds `text_projection`: SD3 reads the
//! penultimate layer's hidden states and the projected pooled output (the final-normed state
//! at the end token).

use std::path::Path;

use super::config::MAX_WIDTH;
use lisa_core::backend::{Backend, DType, Shape, UnaryOp};
use serde_json::{Map, Value};

use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::nn::{AttentionConfig, CLIP_ATTENTION, LayerNorm, Linear, MultiHeadAttention};
use crate::params::{Bound, Init, ParamId, ParamStore, Scope};
use crate::weights::{bad, io, load_tensors, parse_safetensors_skipping};

/// The supported keys of a `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    /// Tokens in the vocabulary (49408).
    pub vocab_size: usize,
    /// Width (768 for SD 1.x, 1024 for SD 2.x).
    pub hidden_size: usize,
    /// MLP width (3072 / 4096).
    pub intermediate_size: usize,
    /// Heads (12 / 16).
    pub num_attention_heads: usize,
    /// Layers (12 / 23).
    pub num_hidden_layers: usize,
    /// Positions (77).
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD 1.x) or `gelu` (SD 2.x).
    pub hidden_act: UnaryOp,
    /// ε of every layer norm (1e-5).
    pub layer_norm_eps: f32,
    /// Width of `text_projection`'s output (`CLIPTextModelWithProjection`; 512).
    pub projection_dim: usize,
    /// The end token the pooled output is read at; 2 (old configs, SD3's) means the first
    /// position of the largest id, as transformers does for it.
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// From a text encoder's `config.json` (the keys that change the computation; a
    /// `projection_dim` or the like, which `CLIPTextModel` does not use, is ignored).
    pub fn from_json(c: &Map<String, Value>) -> Result<Self> {
        let count = |key: &str, default: u64| -> Result<usize> {
            match c.get(key) {
                None | Some(Value::Null) => Ok(default as usize),
                Some(v) => v.as_u64().filter(|&x| x > 0).map(|x| x as usize).ok_or_else(|| {
                    TrainError::Config(format!("text_encoder config.json: {key} = {v} is not a positive count"))
                }),
            }
        };
        let act = match c.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu") {
            "quick_gelu" => UnaryOp::QuickGelu,
            "gelu" => UnaryOp::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => UnaryOp::GeluTanh,
            other => {
                return Err(TrainError::Config(format!(
                    "text_encoder config.json: hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new)"
                )));
            }
        };
        let eps = c.get("layer_norm_eps").and_then(Value::as_f64).unwrap_or(1e-5);
        let config = Self {
            vocab_size: count("vocab_size", 49408)?,
            hidden_size: count("hidden_size", 512)?,
            intermediate_size: count("intermediate_size", 2048)?,
            num_attention_heads: count("num_attention_heads", 8)?,
            num_hidden_layers: count("num_hidden_layers", 12)?,
            max_position_embeddings: count("max_position_embeddings", 77)?,
            hidden_act: act,
            layer_norm_eps: eps as f32,
            projection_dim: count("projection_dim", 512)?,
            eos_token_id: match c.get("eos_token_id") {
                None | Some(Value::Null) => 2,
                Some(v) => v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| {
                    TrainError::Config(format!("text_encoder config.json: eos_token_id = {v} is not a token id"))
                })?,
            },
        };
        let limits = [
            ("vocab_size", config.vocab_size, 1 << 20),
            ("hidden_size", config.hidden_size, MAX_WIDTH),
            ("intermediate_size", config.intermediate_size, 4 * MAX_WIDTH),
            ("num_hidden_layers", config.num_hidden_layers, 256),
            ("max_position_embeddings", config.max_position_embeddings, 1 << 14),
            ("projection_dim", config.projection_dim, MAX_WIDTH),
        ];
        if let Some((key, value, max)) = limits.into_iter().find(|(_, v, max)| v > max) {
            return Err(TrainError::Config(format!(
                "text_encoder config.json: {key} is {value}; lisa supports at most {max}"
            )));
        }
        if !config.hidden_size.is_multiple_of(config.num_attention_heads) || eps.is_nan() || eps <= 0.0 {
            return Err(TrainError::Config(format!(
                "text_encoder config.json: {} heads do not divide hidden_size {} (or layer_norm_eps {eps} is not > 0)",
                config.num_attention_heads, config.hidden_size
            )));
        }
        Ok(config)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    attn: MultiHeadAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// The text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: ParamId,
    position_embedding: ParamId,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias).
    text_projection: Option<Linear>,
}

/// What SD3 reads of a `CLIPTextModelWithProjection`.
pub struct ProjectedText<B: Backend> {
    /// `hidden_states[-2]`: the input of the last layer, `[n, t, hidden]` (f32).
    pub penultimate: Var<B>,
    /// `text_embeds`: the pooled output through `text_projection`, `[n, projection_dim]` (f32).
    pub pooled: Var<B>,
}

impl ClipTextModel {
    /// Parameters under `at.text_model` with transformers' names.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, c: &ClipTextConfig) -> Result<Self> {
        let base = at.into().pp("text_model");
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = base.pp("encoder").pp("layers").pp(i);
            let attn = AttentionConfig {
                query_dim: d,
                context_dim: d,
                heads: c.num_attention_heads,
                head_dim: d / c.num_attention_heads,
                names: CLIP_ATTENTION,
                causal: true,
            };
            layers.push(Layer {
                norm1: LayerNorm::new(s, l.pp("layer_norm1"), d, eps)?,
                attn: MultiHeadAttention::new(s, l.pp("self_attn"), attn)?,
                norm2: LayerNorm::new(s, l.pp("layer_norm2"), d, eps)?,
                fc1: Linear::new(s, l.pp("mlp").pp("fc1"), d, c.intermediate_size)?,
                fc2: Linear::new(s, l.pp("mlp").pp("fc2"), c.intermediate_size, d)?,
            });
        }
        let (init, embeddings) = (Init::LecunNormal { fan_in: d }, base.pp("embeddings"));
        Ok(Self {
            token_embedding: s.add(embeddings.pp("token_embedding").name("weight"), &[c.vocab_size, d], init)?,
            position_embedding: s.add(
                embeddings.pp("position_embedding").name("weight"),
                &[c.max_position_embeddings, d],
                init,
            )?,
            layers,
            final_norm: LayerNorm::new(s, base.pp("final_layer_norm"), d, eps)?,
            text_projection: None,
            config: c.clone(),
        })
    }

    /// `CLIPTextModelWithProjection`: the same under `at.text_model`, and
    /// `at.text_projection` (`[projection_dim, hidden]`, no bias).
    pub fn with_projection<B: Backend>(
        s: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: &ClipTextConfig,
    ) -> Result<Self> {
        let at = at.into();
        let mut model = Self::new(s, &at, c)?;
        model.text_projection =
            Some(Linear::without_bias(s, at.pp("text_projection"), c.hidden_size, c.projection_dim)?);
        Ok(model)
    }

    /// Its settings.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `last_hidden_state [n, t, hidden]` of token ids `ids` (`n` rows of `t` ids each, no
    /// attention mask, as SD's pipelines call it).
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<Var<B>> {
        let (last, _) = self.layers_of(p, ids)?;
        p.tape.cast(&last, DType::F32)
    }

    /// `hidden_states[-2] [n, t, hidden]` (f32): the input of the last layer, not normed (what
    /// SDXL reads of its first text encoder).
    pub fn forward_penultimate<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<Var<B>> {
        let (_, penultimate) = self.layers_of(p, ids)?;
        p.tape.cast(&penultimate, DType::F32)
    }

    /// SD3's and SDXL's reading of a `CLIPTextModelWithProjection` (built by [`Self::with_projection`]):
    /// the penultimate hidden states and `text_projection` of the final-normed state at each
    /// row's end token.
    pub fn forward_projected<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<ProjectedText<B>> {
        let t = p.tape;
        let projection = self
            .text_projection
            .as_ref()
            .ok_or_else(|| TrainError::Config("this CLIP text model was built without text_projection".into()))?;
        let (last, penultimate) = self.layers_of(p, ids)?;
        let pooled = self.end_rows(t, &last, ids)?;
        Ok(ProjectedText {
            penultimate: t.cast(&penultimate, DType::F32)?,
            pooled: t.cast(&projection.forward(p, &pooled)?, DType::F32)?,
        })
    }

    /// `CLIPTextModel`'s `pooler_output` (Flux's pooled text): the final-normed state at each
    /// row's end token, `[n, hidden]` (f32), without a projection.
    pub fn forward_pooled<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<Var<B>> {
        let (last, _) = self.layers_of(p, ids)?;
        p.tape.cast(&self.end_rows(p.tape, &last, ids)?, DType::F32)
    }

    /// `last [n, t, d]` → the end token's row of each prompt, `[n, d]` (gathered on the host:
    /// the encoders run without recording).
    fn end_rows<B: Backend>(&self, t: &crate::autodiff::Tape<B>, last: &Var<B>, ids: &[Vec<u32>]) -> Result<Var<B>> {
        let d = self.config.hidden_size;
        let len = ids[0].len();
        let all = B::to_vec(&last.value)?;
        let mut rows = Vec::with_capacity(ids.len() * d);
        for (r, row) in ids.iter().enumerate() {
            let at = self.end_position(row);
            rows.extend_from_slice(&all[(r * len + at) * d..(r * len + at + 1) * d]);
        }
        let (device, dtype) = (B::device(&last.value), B::dtype(&last.value));
        Ok(t.constant(B::from_slice(&rows, &Shape::new([ids.len(), d]), dtype, &device)?))
    }

    /// Where the pooled output is read: the first position of the largest id when
    /// `eos_token_id` is 2 (transformers' rule for old configs), else the first end token (the
    /// first position when there is none).
    fn end_position(&self, row: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            let max = row.iter().copied().max().unwrap_or(0);
            row.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            row.iter().position(|&id| id == self.config.eos_token_id).unwrap_or(0)
        }
    }

    /// The final-normed last hidden state and the input of the last layer (the penultimate
    /// hidden states; the embeddings when there is one layer), in the storage type.
    fn layers_of<B: Backend>(&self, p: &Bound<'_, B>, ids: &[Vec<u32>]) -> Result<(Var<B>, Var<B>)> {
        let t = p.tape;
        let n = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        let d = self.config.hidden_size;
        if n == 0 || len == 0 || len > self.config.max_position_embeddings || ids.iter().any(|r| r.len() != len) {
            return Err(TrainError::Mismatch(format!(
                "token ids: {n} rows of {len}: expected rows of equal length 1..={}",
                self.config.max_position_embeddings
            )));
        }
        // Token + position embeddings, gathered on the host (frozen tables).
        let table = B::to_vec(&p.p(self.token_embedding).value)?;
        let positions = B::to_vec(&p.p(self.position_embedding).value)?;
        let mut x = Vec::with_capacity(n * len * d);
        for row in ids {
            for (pos, &id) in row.iter().enumerate() {
                let id = id as usize;
                if id >= self.config.vocab_size {
                    return Err(TrainError::Mismatch(format!(
                        "token id {id} is outside the vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                x.extend(
                    table[id * d..(id + 1) * d].iter().zip(&positions[pos * d..(pos + 1) * d]).map(|(a, b)| a + b),
                );
            }
        }
        let table = &p.p(self.token_embedding).value;
        let (device, dtype) = (B::device(table), B::dtype(table));
        let mut h = t.constant(B::from_slice(&x, &Shape::new([n, len, d]), dtype, &device)?);
        let mut penultimate = h.clone();
        for l in &self.layers {
            penultimate = h.clone();
            let a = l.attn.forward(p, &l.norm1.forward(p, &h)?, None)?;
            h = t.add(&h, &a)?;
            let m =
                l.fc2.forward(p, &t.unary(self.config.hidden_act, &l.fc1.forward(p, &l.norm2.forward(p, &h)?)?)?)?;
            h = t.add(&h, &m)?;
        }
        Ok((self.final_norm.forward(p, &h)?, penultimate))
    }
}

/// Loads a transformers text-encoder folder (`model.safetensors`) into `store` under
/// `at`, all-or-nothing. Names with or without the `text_model.` prefix (transformers 5
/// writes them without, the SD repositories hold them with) are accepted; the
/// `position_ids` buffer some files hold is skipped; `text_projection.*` stays beside
/// `text_model` (`CLIPTextModelWithProjection`).
pub fn load_clip<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, dir: &Path) -> Result<usize> {
    let at = at.into();
    let text_model = at.pp("text_model");
    let path = if dir.is_file() { dir.to_path_buf() } else { dir.join("model.safetensors") };
    if !path.is_file() {
        return Err(bad(dir, "holds no model.safetensors"));
    }
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let file = parse_safetensors_skipping(&path, &bytes, |k| k.ends_with("embeddings.position_ids"))?;
    let tensors = file
        .tensors
        .into_iter()
        .map(|(k, v)| {
            let name = if k.starts_with("text_projection.") {
                at.name(&k)
            } else {
                text_model.name(k.strip_prefix("text_model.").unwrap_or(&k))
            };
            (name, v)
        })
        .collect();
    load_tensors(store, &path, tensors, |n| at.contains(n), |_| false)
}
