//! Validation of a latent-space model: samples for fixed condition images and prompts
//! (diffusers' `--validation_image` / `--validation_prompt`), several per pair with the seeds
//! `seed, seed + 1, …` (`--num_validation_images`), decoded by the pipeline's VAE, drawn as a
//! grid of `condition | sample | sample …` rows, and, with a [`ControlScore`], measured: how
//! well each sample follows its condition, averaged over pairs and seeds, so that the curve is
//! comparable across steps, runs and arms. A side network that reads condition latents (SD3,
//! Flux) samples with those and shows the images they were encoded from.

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

/// How well a sample follows its condition, as a few numbers (the condition type's own
/// measure: edge F1 for edge maps, depth error for depth maps, …).
pub trait ControlScore {
    /// The names of the numbers [`ControlScore::score`] returns (their metrics.jsonl columns);
    /// the first is the validation's headline score.
    fn columns(&self) -> &[&'static str];
    /// The numbers for one sample: `condition` and `sample` as 8-bit RGB `[side, side, 3]`
    /// (the condition scaled to the sample's size, as the grid shows it).
    fn score(&self, condition: &[u8], sample: &[u8], side: usize) -> Vec<f32>;
}

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
    /// Samples per pair, seeds `sampling.seed + k`.
    samples_per_pair: usize,
    score: Option<Box<dyn ControlScore>>,
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
        Ok(Self { conditions, prompts, vae, sampling, shown, samples_per_pair: 1, score: None })
    }

    /// `k` samples per pair (≥ 1), with the seeds `seed, seed + 1, …, seed + k − 1`.
    pub fn with_samples_per_pair(mut self, k: usize) -> Result<Self> {
        if k == 0 || k > MAX_SAMPLES_PER_PAIR {
            return Err(TrainError::Config(format!(
                "samples per validation pair: 1..={MAX_SAMPLES_PER_PAIR}, got {k}"
            )));
        }
        self.samples_per_pair = k;
        Ok(self)
    }

    /// Measures every sample with `score` (means over pairs and seeds in the metrics row).
    pub fn with_score(mut self, score: Box<dyn ControlScore>) -> Self {
        self.score = Some(score);
        self
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

/// The most samples per validation pair (each is a whole sampling run).
pub const MAX_SAMPLES_PER_PAIR: usize = 64;

impl<B: Backend> Validator<B> for LatentValidation<B> {
    fn columns(&self) -> &[&'static str] {
        self.score.as_ref().map_or(&[], |s| s.columns())
    }

    fn validate(&mut self, trainer: &Trainer<B>) -> Result<ValidationReport> {
        let model = trainer.model.as_ref();
        let (n, k) = (self.prompts.len(), self.samples_per_pair);
        let [c, h, w] = model.hint_shape();
        let hint = B::from_slice(&self.conditions, &Shape::new([n, c, h, w]), DType::F32, model.store().device())?;
        let prompts: Vec<&str> = self.prompts.iter().map(String::as_str).collect();
        // Per seed, [n, 3, side, side] in [-1, 1].
        let mut images = Vec::with_capacity(k);
        for seed in 0..k as u64 {
            let sampling = SampleConfig { seed: self.sampling.seed.wrapping_add(seed), ..self.sampling.clone() };
            let latents = sample(model, &trainer.config.noise, &hint, &prompts, &sampling)?;
            images.push(self.vae.images(&latents)?);
        }
        let side = ((images[0].len() / (n * 3).max(1)) as f64).sqrt() as usize;
        let cell = side + 2;
        let mut grid = RgbGrid::new((1 + k) * cell, n * cell);
        let (shown, [c, h, w]) = (&self.shown.0, self.shown.1);
        for i in 0..n {
            let cond = &shown[i * c * h * w..(i + 1) * c * h * w];
            // The condition at the sample's size when they differ (nearest).
            let scaled: Vec<f32> = (0..c)
                .flat_map(|ch| {
                    (0..side * side).map(move |q| {
                        let (y, x) = (q / side * h / side, q % side * w / side);
                        cond[ch * h * w + y * w + x]
                    })
                })
                .collect();
            grid.paste_planar(&scaled, c, side, (0, i * cell), (0.0, 1.0));
            for (j, seed_images) in images.iter().enumerate() {
                let image = &seed_images[i * 3 * side * side..(i + 1) * 3 * side * side];
                grid.paste_planar(image, 3, side, ((1 + j) * cell, i * cell), (-1.0, 1.0));
            }
        }
        let mut report = ValidationReport { grid: None, ..Default::default() };
        if let Some(score) = &self.score {
            // Means over every (pair, seed), of the bytes the grid shows.
            let mut sums = vec![0f64; score.columns().len()];
            for i in 0..n {
                let condition = grid.crop((0, i * cell), side, side);
                for j in 0..k {
                    let values = score.score(&condition, &grid.crop(((1 + j) * cell, i * cell), side, side), side);
                    for (sum, v) in sums.iter_mut().zip(values) {
                        *sum += f64::from(v);
                    }
                }
            }
            let means: Vec<f32> = sums.iter().map(|s| (s / (n * k) as f64) as f32).collect();
            for (name, mean) in score.columns().iter().zip(&means) {
                report.metrics.insert(name.to_string(), (*mean).into());
            }
            report.score = means.first().copied();
            report.score_name = score.columns().first().copied().unwrap_or("");
        }
        report.grid = Some(grid);
        Ok(report)
    }
}
