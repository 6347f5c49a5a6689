//! The pipeline's frozen encoders on a device, ready to use: the VAE (images → training
//! latents, latents → images) and the text encoder with its tokenizer (prompts → the UNet's
//! `encoder_hidden_states`). Both run without recording gradients.

use std::path::Path;

use lisa_core::backend::{Backend, DType, Shape};

use super::clip::{ClipTextConfig, ClipTextModel, load_clip};
use super::folder::read_json_config;
use super::tokenizer::ClipTokenizer;
use super::vae::{AutoencoderKl, VaeConfig, load_vae};
use crate::autodiff::Tape;
use crate::error::{Result, TrainError};
use crate::params::{ParamStore, Scope};
use crate::weights::bad;

/// The most images or prompts one encoder call holds.
const CHUNK: usize = 8;

/// The VAE with its weights.
pub struct Vae<B: Backend> {
    store: ParamStore<B>,
    model: AutoencoderKl,
}

impl<B: Backend> Vae<B> {
    /// From a diffusers `vae/` folder, its weights stored as `dtype`.
    pub fn open(dir: &Path, device: B::Device, dtype: DType) -> Result<Self> {
        let config = VaeConfig::from_json(&read_json_config(dir)?)?;
        let mut store = ParamStore::new(device, 0).freeze_prefix("");
        let model = AutoencoderKl::new(&mut store, Scope::root(), &config)?;
        load_vae(&mut store, Scope::root(), dir)?;
        cast_all(&mut store, dtype)?;
        Ok(Self { store, model })
    }

    /// Its settings.
    pub fn config(&self) -> &VaeConfig {
        self.model.config()
    }

    /// Training latents `(mean − shift_factor) · scaling_factor` of `n` images `[3, side, side]` in [−1, 1]
    /// (row-major in `images`): `n · latent · (side/f)²` values.
    pub fn latents(&self, images: &[f32], n: usize, side: usize) -> Result<Vec<f32>> {
        let c = self.config().in_channels;
        if images.len() != n * c * side * side {
            return Err(TrainError::Mismatch(format!("{} values for {n} images of {c}×{side}×{side}", images.len())));
        }
        let per = c * side * side;
        let mut out = Vec::new();
        for start in (0..n).step_by(CHUNK) {
            let k = CHUNK.min(n - start);
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let x = B::from_slice(
                &images[start * per..(start + k) * per],
                &Shape::new([k, c, side, side]),
                DType::F32,
                self.store.device(),
            )?;
            let z = tape.no_grad(|| self.model.latents(&p, &tape.constant(x)))?;
            out.extend(B::to_vec(&B::cast(&z.value, DType::F32)?)?);
        }
        Ok(out)
    }

    /// Images `[n, 3, f·h, f·w]` (about [−1, 1]) of training latents `[n, latent, h, w]`
    /// (divided by `scaling_factor` and shifted back first, as diffusers' pipelines do).
    pub fn images(&self, latents: &B::Tensor) -> Result<Vec<f32>> {
        let s = B::shape(latents);
        let n = s.dims().first().copied().unwrap_or(0);
        let per = s.num_elements()? / n.max(1);
        let all = B::to_vec(latents)?;
        let mut out = Vec::new();
        for start in (0..n).step_by(CHUNK) {
            let k = CHUNK.min(n - start);
            let mut dims = s.dims().to_vec();
            dims[0] = k;
            let z = B::from_slice(
                &all[start * per..(start + k) * per],
                &Shape::new(dims),
                DType::F32,
                self.store.device(),
            )?;
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let img = tape.no_grad(|| self.model.decode_latents(&p, &tape.constant(z)))?;
            out.extend(B::to_vec(&B::cast(&img.value, DType::F32)?)?);
        }
        Ok(out)
    }
}

/// The CLIP text encoder with its tokenizer.
pub struct TextEncoder<B: Backend> {
    store: ParamStore<B>,
    model: ClipTextModel,
    tokenizer: ClipTokenizer,
}

/// What [`TextEncoder::embed`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TextEmbeddings {
    /// `[n, tokens, dim]` row-major.
    pub values: Vec<f32>,
    /// Tokens per prompt (77).
    pub tokens: usize,
    /// Width.
    pub dim: usize,
    /// The prompts the tokenizer cut to fit.
    pub truncated: Vec<usize>,
}

/// The text encoder's config and the tokenizer of a pipeline, checked to be a pair: every
/// token id the tokenizer makes has an embedding, every position of its longest encoding a
/// position embedding. Errors name the folders.
pub fn read_text_pair(text_encoder: &Path, tokenizer_dir: &Path) -> Result<(ClipTextConfig, ClipTokenizer)> {
    let config_path = text_encoder.join("config.json");
    let config = ClipTextConfig::from_json(&read_json_config(text_encoder)?).map_err(|e| match e {
        TrainError::Config(m) => bad(&config_path, m.split_once("config.json: ").map_or(m.clone(), |(_, r)| r.into())),
        other => other,
    })?;
    let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)?;
    if tokenizer.id_bound() > config.vocab_size {
        return Err(bad(
            tokenizer_dir,
            format!(
                "the tokenizer makes token ids up to {}; the text encoder ({}) embeds only {} (vocab_size): they are not a pair",
                tokenizer.id_bound() - 1,
                config_path.display(),
                config.vocab_size
            ),
        ));
    }
    if tokenizer.max_length() > config.max_position_embeddings {
        return Err(bad(
            tokenizer_dir,
            format!(
                "the tokenizer's {} tokens exceed the {} positions of the text encoder ({})",
                tokenizer.max_length(),
                config.max_position_embeddings,
                config_path.display()
            ),
        ));
    }
    Ok((config, tokenizer))
}

impl<B: Backend> TextEncoder<B> {
    /// From a pipeline's `text_encoder/` and `tokenizer/` folders, its weights stored as
    /// `dtype`.
    pub fn open(text_encoder: &Path, tokenizer: &Path, device: B::Device, dtype: DType) -> Result<Self> {
        let (config, tokenizer) = read_text_pair(text_encoder, tokenizer)?;
        let mut store = ParamStore::new(device, 0).freeze_prefix("");
        let model = ClipTextModel::new(&mut store, Scope::root(), &config)?;
        load_clip(&mut store, Scope::root(), text_encoder)?;
        cast_all(&mut store, dtype)?;
        Ok(Self { store, model, tokenizer })
    }

    /// Width of its embeddings.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// `last_hidden_state` of every prompt.
    pub fn embed(&self, prompts: &[&str]) -> Result<TextEmbeddings> {
        let ids = self.tokenizer.encode(prompts)?;
        let mut values = Vec::new();
        for chunk in ids.ids.chunks(CHUNK) {
            let tape = Tape::<B>::new();
            let p = self.store.bind(&tape);
            let h = tape.no_grad(|| self.model.forward(&p, chunk))?;
            values.extend(B::to_vec(&h.value)?);
        }
        Ok(TextEmbeddings { values, tokens: self.tokenizer.max_length(), dim: self.dim(), truncated: ids.truncated })
    }
}

/// Every tensor of a frozen store in `dtype` (mixed precision).
pub(crate) fn cast_all<B: Backend>(store: &mut ParamStore<B>, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        return Ok(());
    }
    if !B::supports_dtype(store.device(), dtype) {
        return Err(TrainError::Config(format!("this backend's device cannot store {dtype}")));
    }
    let ids: Vec<_> = store.iter().map(|(id, _)| id).collect();
    for id in ids {
        let v = B::cast(&store.get(id).value, dtype)?;
        store.get_mut(id).value = v;
    }
    Ok(())
}
