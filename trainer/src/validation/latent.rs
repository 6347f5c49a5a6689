//! Validation of a latent-space model: samples for fixed condition images and prompts
//! (diffusers' `--validation_image` / `--validation_prompt`), decoded by the pipeline's VAE,
//! drawn as a grid of `condition | sample` rows. A side network that reads condition latents
//! (SD3) samples with those and shows the images they were encoded from.

use lisa_core::backend::{Backend, DType, Shape};

use super::check_sampling;
use crate::error::{Result, TrainError};
use crate::grid::RgbGrid;
use crate::model::DualDenoiser;
use crate::model::sd::Vae;
use crate::sample::{SampleConfig, sample};
use crate::scheduler::NoiseConfig;
use crate::session::{ValidationReport, Validator};
use crate::train::Trainer;

/// Sampled, VAE-decoded validation grids of a latent-space model.
pub struct LatentValidation<B: Backend> {
    /// `[n, c, h, w]` what the side network reads, at the model's condition shape: condition
    /// images in [0, 1], or their latents.
    conditions: Vec<f32>,
    /// The condition images the grid shows (`[n, c, h, w]` in [0, 1]) and their shape.
    shown: (Vec<f32>, [usize; 3]),
    prompts: Vec<String>,
    vae: Vae<B>,
    sampling: SampleConfig,
}

impl<B: Backend> LatentValidation<B> {
    /// Validation with one prompt per condition image (`conditions`: the images one after the
    /// other, each at `model.hint_shape()`, values in [0, 1]), decoded by `vae`. Checked now.
    pub fn new(
        model: &dyn DualDenoiser<B>,
        noise: &NoiseConfig,
        conditions: Vec<f32>,
        prompts: Vec<String>,
        vae: Vae<B>,
        sampling: SampleConfig,
    ) -> Result<Self> {
        check_sampling(model, noise, &sampling)?;
        let per: usize = model.hint_shape().iter().product();
        if prompts.is_empty() || conditions.len() != prompts.len() * per {
            return Err(TrainError::Mismatch(format!(
                "{} validation prompts need as many condition images of {:?} ({} values), got {} values",
                prompts.len(),
                model.hint_shape(),
                per,
                conditions.len()
            )));
        }
        let shown = (conditions.clone(), model.hint_shape());
        Ok(Self { conditions, prompts, vae, sampling, shown })
    }

    /// The same for a side network that reads condition latents (`hints`, each at
    /// `model.hint_shape()`), the grid showing the images `shown` (`[n, c, h, w]` in [0, 1],
    /// `shape = [c, h, w]`) they were encoded from.
    pub fn with_latent_hints(
        model: &dyn DualDenoiser<B>,
        noise: &NoiseConfig,
        hints: Vec<f32>,
        (shown, shape): (Vec<f32>, [usize; 3]),
        prompts: Vec<String>,
        vae: Vae<B>,
        sampling: SampleConfig,
    ) -> Result<Self> {
        let mut v = Self::new(model, noise, hints, prompts, vae, sampling)?;
        if shown.len() != v.prompts.len() * shape.iter().product::<usize>() {
            return Err(TrainError::Mismatch(format!(
                "{} validation images of {shape:?} hold {} values",
                v.prompts.len(),
                shown.len()
            )));
        }
        v.shown = (shown, shape);
        Ok(v)
    }
}

impl<B: Backend> Validator<B> for LatentValidation<B> {
    fn validate(&mut self, trainer: &Trainer<B>) -> Result<ValidationReport> {
        let model = trainer.model.as_ref();
        let n = self.prompts.len();
        let [c, h, w] = model.hint_shape();
        let hint = B::from_slice(&self.conditions, &Shape::new([n, c, h, w]), DType::F32, model.store().device())?;
        let prompts: Vec<&str> = self.prompts.iter().map(String::as_str).collect();
        let latents = sample(model, &trainer.config.noise, &hint, &prompts, &self.sampling)?;
        // [n, 3, side, side] in [-1, 1].
        let images = self.vae.images(&latents)?;
        let side = ((images.len() / (n * 3).max(1)) as f64).sqrt() as usize;
        let mut grid = RgbGrid::new(2 * (side + 2), n * (side + 2));
        let (shown, [c, h, w]) = (&self.shown.0, self.shown.1);
        for i in 0..n {
            let cond = &shown[i * c * h * w..(i + 1) * c * h * w];
            // The condition at the sample's size when they differ (nearest).
            let scaled: Vec<f32> = (0..c)
                .flat_map(|ch| {
                    (0..side * side).map(move |k| {
                        let (y, x) = (k / side * h / side, k % side * w / side);
                        cond[ch * h * w + y * w + x]
                    })
                })
                .collect();
            grid.paste_planar(&scaled, c, side, (0, i * (side + 2)), (0.0, 1.0));
            let image = &images[i * 3 * side * side..(i + 1) * 3 * side * side];
            grid.paste_planar(image, 3, side, (side + 2, i * (side + 2)), (-1.0, 1.0));
        }
        Ok(ValidationReport { score: None, metrics: Default::default(), grid: Some(grid) })
    }
}
