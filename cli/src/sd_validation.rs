//! The files of a latent-space model's validation: condition images and prompts (diffusers'
//! `--validation_image` / `--validation_prompt`) and the pipeline's VAE, read for the
//! library's `LatentValidation`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::model::DualDenoiser;

use crate::image::{Resample, read_image};

/// What a latent-space run validates with.
#[derive(Debug, Clone)]
pub struct LatentValidationFiles {
    /// The condition images.
    pub images: Vec<PathBuf>,
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// The VAE folder that decodes the samples.
    pub vae: PathBuf,
    /// The VAE's storage type.
    pub dtype: lisa_core::backend::DType,
    /// A latent-hint model's condition images enter the VAE in [−1, 1] (Flux, as
    /// train_controlnet_flux.py), not [0, 1] (SD3).
    pub signed_hints: bool,
}

impl LatentValidationFiles {
    /// The validation of a pipeline folder's run from the flags ([`validation_pairs`]), with
    /// the folder's VAE in `dtype` (None when no image is given), and the validation prompts,
    /// which the run encodes with its training prompts.
    pub fn from_flags(
        images: &[PathBuf],
        prompts: &[String],
        vae: &Path,
        dtype: lisa_core::backend::DType,
    ) -> Result<(Option<Self>, Vec<String>)> {
        let (images, prompts) = validation_pairs(images, prompts)?;
        let files = (!images.is_empty()).then(|| Self {
            images,
            prompts: prompts.clone(),
            vae: vae.to_path_buf(),
            dtype,
            signed_hints: false,
        });
        Ok((files, prompts))
    }
}

/// Pairs the flags as diffusers does: one prompt per image, or one prompt (or one image)
/// for all.
fn validation_pairs(images: &[PathBuf], prompts: &[String]) -> Result<(Vec<PathBuf>, Vec<String>)> {
    match (images.len(), prompts.len()) {
        (0, 0) => Ok((Vec::new(), Vec::new())),
        (0, _) => bail!("--validation-prompt needs --validation-image"),
        (_, 0) => bail!("--validation-image needs --validation-prompt (one per image, or one for all)"),
        (n, m) if n == m => Ok((images.to_vec(), prompts.to_vec())),
        (n, 1) => Ok((images.to_vec(), vec![prompts[0].clone(); n])),
        (1, m) => Ok((vec![images[0].clone(); m], prompts.to_vec())),
        (n, m) => {
            bail!("{n} --validation-image and {m} --validation-prompt: give one prompt per image, or one for all")
        }
    }
}

/// The condition images at the model's condition shape (resized and centre-cropped), read
/// before training starts so that a bad file stops the run now.
pub fn read_conditions<B: Backend>(model: &dyn DualDenoiser<B>, v: &LatentValidationFiles) -> Result<Vec<f32>> {
    let [c, h, _] = model.hint_shape();
    let mut out = Vec::new();
    for path in &v.images {
        let img = read_image(path, h, c == 1, if c == 1 { Resample::Max } else { Resample::CenterCrop })
            .with_context(|| format!("--validation-image {}", path.display()))?;
        out.extend(img);
    }
    Ok(out)
}

/// The condition images as RGB at `side` pixels (resized and centre-cropped), in [0, 1]: what
/// a side network that reads condition latents has encoded (SD3), read before training.
pub fn read_rgb(v: &LatentValidationFiles, side: usize) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for path in &v.images {
        let img = read_image(path, side, false, Resample::CenterCrop)
            .with_context(|| format!("--validation-image {}", path.display()))?;
        out.extend(img);
    }
    Ok(out)
}
