//! Validation of the toy task (docs/method.md §6): the fixed validation outlines sampled with
//! fixed seeds and scored (controllability IoU, colour error, a grid of condition | sample
//! pairs), and the research instruments read at the same moment: the shares of `τ` per
//! timestep bucket and the linear probe from side features to the circle.

use lisa_core::backend::{Backend, DType, Shape};

use super::check_sampling;
use crate::analysis::probe::{ridge_probe, side_features};
use crate::analysis::tau_share::{TauShare, tau_shares};
use crate::data::{Dataset, Example, FillCircles};
use crate::error::{Result, TrainError};
use crate::grid::RgbGrid;
use crate::metrics::{colour_error, controllability_iou};
use crate::model::{DualDenoiser, HookLayer};
use crate::sample::{SampleConfig, sample};
use crate::scheduler::NoiseConfig;
use crate::session::{ValidationReport, Validator};
use crate::train::Trainer;

/// Timestep buckets of the τ shares logged with every validation.
pub const TAU_BUCKETS: usize = 5;
/// Examples of the linear probe from side features to the circle.
pub const PROBE_EXAMPLES: usize = 256;
/// The timestep fraction t/T at which the probe reads the side features.
pub const PROBE_T: f32 = 0.5;
/// The most validation samples (they are sampled as one batch).
pub const MAX_VALIDATION_SAMPLES: usize = 4096;

/// What sampling the validation set measured.
pub struct ToyScores {
    /// Mean IoU between generated circles and the conditions' discs.
    pub iou: f32,
    /// Mean colour error (0 = perfect).
    pub colour_error: f32,
    /// Condition | sample pairs, eight pairs per row, shown at ≥ 96 px per image.
    pub grid: RgbGrid,
}

/// The validation set's size lies in `1..=MAX_VALIDATION_SAMPLES` (`[validation] samples`).
fn check_samples(n: usize) -> Result<()> {
    if !(1..=MAX_VALIDATION_SAMPLES).contains(&n) {
        let reason = format!("must lie in 1..={MAX_VALIDATION_SAMPLES}, got {n}");
        return Err(TrainError::setting("validation.samples", reason));
    }
    Ok(())
}

/// Samples the validation set `set` with the seeds `cfg` fixes and scores it.
pub fn validate_toy<B: Backend>(
    model: &dyn DualDenoiser<B>,
    noise: &NoiseConfig,
    set: &FillCircles,
    cfg: &SampleConfig,
) -> Result<ToyScores> {
    let (r, n) = (set.resolution, set.len);
    check_samples(n)?;
    let hint_channels = model.hint_channels();
    let mut hints = Vec::with_capacity(n * r * r);
    let mut prompts = Vec::with_capacity(n);
    for i in 0..n {
        let e = set.get(i)?;
        hints.extend_from_slice(&e.hint);
        prompts.push(e.prompt);
    }
    let hint = B::from_slice(&hints, &Shape::new([n, hint_channels, r, r]), DType::F32, model.store().device())
        .map_err(|e| TrainError::Mismatch(format!("the validation outlines do not fit the model's condition ({e})")))?;
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    // [n, 3, r, r] in [-1, 1].
    let images = B::to_vec(&sample(model, noise, &hint, &prompts, cfg)?)?;
    let per = 3 * r * r;
    let (mut iou, mut col) = (0.0, 0.0);
    let cols = 8.min(n).max(1);
    let mut grid = RgbGrid::new(cols * 2 * (r + 2), n.div_ceil(cols) * (r + 2));
    for i in 0..n {
        let img = &images[i * per..(i + 1) * per];
        let circle = set.circle(i);
        iou += controllability_iou(img, r, &circle);
        col += colour_error(img, r, &circle);
        let (x, y) = ((i % cols) * 2 * (r + 2), (i / cols) * (r + 2));
        grid.paste_planar(&hints[i * r * r..(i + 1) * r * r], 1, r, (x, y), (0.0, 1.0));
        grid.paste_planar(img, 3, r, (x + r + 2, y), (-1.0, 1.0));
    }
    // Shown at ≥ 96 px per image: a 16-px sample is unreadable at its own size.
    let grid = grid.upscaled((96 / r).max(1));
    Ok(ToyScores { iou: iou / n as f32, colour_error: col / n as f32, grid })
}

/// The toy task's validation: IoU, colour error and the grid on the validation set; the
/// shares of `τ` on the same examples; the probe's held-out `R²` for the circle's centre x,
/// centre y and radius on examples of its own.
pub struct ToyValidation {
    set: FillCircles,
    sampling: SampleConfig,
    seed: u64,
    hook: HookLayer,
    examples: Vec<Example>,
    probe_examples: Vec<Example>,
    probe_targets: Vec<Vec<f64>>,
}

impl ToyValidation {
    /// Validation of `model` on `set` (at the model's resolution) with the sampler `sampling`
    /// of the noise process `noise`; `seed` fixes the τ-share and probe draws. The probe
    /// reads the side feature at the model's LISA hook (the configured one, also without a
    /// decoder). Every setting is checked now, before any training.
    pub fn new<B: Backend>(
        model: &dyn DualDenoiser<B>,
        noise: &NoiseConfig,
        set: FillCircles,
        sampling: SampleConfig,
        seed: u64,
    ) -> Result<Self> {
        check_sampling(model, noise, &sampling)?;
        check_samples(set.len)?;
        if set.resolution != model.sample_shape()[1] {
            return Err(TrainError::Config(format!(
                "the validation set is {} px, the model samples {} px",
                set.resolution,
                model.sample_shape()[1]
            )));
        }
        let examples = (0..set.len).map(|i| set.get(i)).collect::<Result<Vec<_>>>()?;
        // The linear probe's examples: their own circles, not the validation set's.
        let probe_set = FillCircles { len: PROBE_EXAMPLES, seed: set.seed.wrapping_add(1), ..set.clone() };
        let probe_examples = (0..probe_set.len).map(|i| probe_set.get(i)).collect::<Result<Vec<_>>>()?;
        let probe_targets = (0..probe_set.len)
            .map(|i| probe_set.circle(i))
            .map(|c| vec![c.cx as f64, c.cy as f64, c.radius as f64])
            .collect();
        let hook = model.spec().hook()?;
        Ok(Self { set, sampling, seed, hook, examples, probe_examples, probe_targets })
    }
}

impl<B: Backend> Validator<B> for ToyValidation {
    fn columns(&self) -> &[&'static str] {
        &["iou", "colour_error"]
    }

    fn validate(&mut self, trainer: &Trainer<B>) -> Result<ValidationReport> {
        let (model, config) = (trainer.model.as_ref(), &trainer.config);
        let scores = validate_toy(model, &config.noise, &self.set, &self.sampling)?;
        let norm = trainer.measured_tau_norm();
        let shares = tau_shares(model, &config.lisa, &config.noise, norm, &self.examples, TAU_BUCKETS, self.seed)?;
        let (features, dim) = side_features(model, self.hook, &config.noise, &self.probe_examples, PROBE_T, self.seed)?;
        let probe = ridge_probe(&features, dim, &self.probe_targets)?;
        let column = |f: fn(&TauShare) -> Option<f32>| shares.iter().map(f).collect::<Vec<_>>();
        let metrics = [
            ("iou", scores.iou.into()),
            ("colour_error", scores.colour_error.into()),
            // One value per bucket, low timesteps first (null entries without a decoder).
            ("tau_zero_distance", column(|s| Some(s.zero_distance)).into()),
            ("tau_share_decoder", column(|s| s.decoder).into()),
            ("tau_share_control", column(|s| Some(s.control)).into()),
            // Held-out R² for the centre x, centre y and radius.
            ("probe_r2", probe.r2.into()),
        ]
        .into_iter()
        .map(|(k, v): (&str, serde_json::Value)| (k.to_string(), v))
        .collect();
        Ok(ValidationReport { score: Some(scores.iou), score_name: "iou", metrics, grid: Some(scores.grid) })
    }
}
