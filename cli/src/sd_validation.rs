//! Validation of a latent-space model: samples for fixed condition images and prompts
//! (diffusers' `--validation_image` / `--validation_prompt`), decoded by the pipeline's VAE,
//! written as a grid of `condition | sample` rows.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_trainer::model::DualDenoiser;
use lisa_trainer::model::sd::Vae;
use lisa_trainer::sample::{SampleConfig, sample};
use lisa_trainer::scheduler::NoiseConfig;

use crate::image::{Resample, canvas, paste_planar, read_image};

/// What a latent-space run validates with.
#[derive(Debug, Clone)]
pub struct LatentValidation {
    /// The condition images.
    pub images: Vec<PathBuf>,
    /// One prompt per image.
    pub prompts: Vec<String>,
    /// The VAE folder that decodes the samples.
    pub vae: PathBuf,
    /// The VAE's storage type.
    pub dtype: lisa_core::backend::DType,
}

/// Pairs the flags as diffusers does: one prompt per image, or one prompt (or one image)
/// for all.
pub fn validation_pairs(images: &[PathBuf], prompts: &[String]) -> Result<(Vec<PathBuf>, Vec<String>)> {
    match (images.len(), prompts.len()) {
        (0, 0) => Ok((Vec::new(), Vec::new())),
        (0, _) => bail!("--validation-prompt needs --validation-image"),
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
pub fn read_conditions<B: Backend>(model: &dyn DualDenoiser<B>, v: &LatentValidation) -> Result<Vec<f32>> {
    let [c, h, _] = model.hint_shape();
    let mut out = Vec::new();
    for path in &v.images {
        let img = read_image(path, h, c == 1, if c == 1 { Resample::Max } else { Resample::CenterCrop })
            .with_context(|| format!("--validation-image {}", path.display()))?;
        out.extend(img);
    }
    Ok(out)
}

/// Samples every pair and decodes it: a grid with one `condition | sample` row per pair.
pub fn validate_latent<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    v: &LatentValidation,
    conditions: &[f32],
    vae: &Vae<B>,
    cfg: &SampleConfig,
) -> Result<RgbImage> {
    let n = v.prompts.len();
    let [c, h, w] = model.hint_shape();
    let hint = B::from_slice(conditions, &Shape::new([n, c, h, w]), DType::F32, model.store().device())?;
    let prompts: Vec<&str> = v.prompts.iter().map(String::as_str).collect();
    let latents = sample(model, noise, &hint, &prompts, cfg)?;
    let images = vae.images(&latents)?;
    let side = images.len() / (n * 3).max(1);
    let side = (side as f64).sqrt() as usize;
    let mut grid = canvas(2 * (side + 2), n * (side + 2));
    for i in 0..n {
        let cond = &conditions[i * c * h * w..(i + 1) * c * h * w];
        // The condition at the sample's size when they differ (nearest).
        let scaled: Vec<f32> = (0..c)
            .flat_map(|ch| {
                (0..side * side).map(move |k| {
                    let (y, x) = (k / side * h / side, k % side * w / side);
                    cond[ch * h * w + y * w + x]
                })
            })
            .collect();
        paste_planar(&mut grid, &scaled, c, side, (0, i * (side + 2)), (0.0, 1.0));
        paste_planar(
            &mut grid,
            &images[i * 3 * side * side..(i + 1) * 3 * side * side],
            3,
            side,
            (side + 2, i * (side + 2)),
            (-1.0, 1.0),
        );
    }
    Ok(grid)
}
