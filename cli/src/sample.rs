//! `lisa sample`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_trainer::data::{PALETTE, prompt_colours};
use lisa_trainer::model::toy;
use lisa_trainer::sample::{Sampler, sample};
use lisa_trainer::validation::RgbGrid;

use crate::eval::ModelArgs;
use crate::image::{Resample, read_image, save_grid};

/// Flags of `lisa sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Condition image(s): an outline on black (PNG, resized to the model resolution).
    #[arg(long, required = true)]
    condition: Vec<PathBuf>,
    /// Prompt: `"<colour> circle with <colour> background"`, colours from the palette.
    #[arg(long)]
    prompt: String,
    /// Output PNG (conditions and samples side by side).
    #[arg(long, default_value = "sample.png")]
    output: PathBuf,
    /// The sampler (euler on rectified-flow models only).
    #[arg(long, value_enum, default_value = "ddim")]
    sampler: SamplerKind,
    /// DDIM η.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    eta: f32,
    /// Sampling steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Residual multiplier.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    control_scale: f32,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    guidance_scale: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The samplers `--sampler` names (the library's [`Sampler`], without its settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SamplerKind {
    /// DDIM with `--eta`.
    Ddim,
    /// Ancestral DDPM.
    Ddpm,
    /// Euler steps of the flow ODE.
    Euler,
}

/// Runs `lisa sample`.
pub fn run<B: Backend>(a: SampleArgs, device: B::Device) -> Result<()> {
    let (mut file, model) = a.model.load::<B>(device)?;
    if model.architecture() == toy::NAME {
        check_toy_prompt(&a.prompt)?;
    }
    let s = &mut file.validation.sampling;
    s.sampler = match a.sampler {
        SamplerKind::Ddim => Sampler::Ddim { eta: a.eta },
        SamplerKind::Ddpm => Sampler::Ddpm,
        SamplerKind::Euler => Sampler::Euler,
    };
    (s.steps, s.control_scale, s.guidance_scale, s.seed) = (a.steps, a.control_scale, a.guidance_scale, a.seed);
    let [_, r, _] = model.sample_shape();
    if model.hint_channels() != 1 {
        bail!("this model reads {}-channel conditions; lisa sample reads grey condition images", model.hint_channels());
    }
    let n = a.condition.len();
    let mut hints = Vec::with_capacity(n * r * r);
    for path in &a.condition {
        hints.extend(read_image(path, r, true, Resample::Max).with_context(|| format!("{}", path.display()))?);
    }
    let hint = B::from_slice(&hints, &Shape::new([n, 1, r, r]), DType::F32, model.store().device())?;
    let prompts = vec![a.prompt.as_str(); n];
    let images = sample(model.as_ref(), &file.train.noise, &hint, &prompts, &file.validation.sampling)?;
    let images = B::to_vec(&images)?;
    let mut out = RgbGrid::new(2 * (r + 2), n * (r + 2));
    for i in 0..n {
        out.paste_planar(&hints[i * r * r..(i + 1) * r * r], 1, r, (0, i * (r + 2)), (0.0, 1.0));
        out.paste_planar(&images[i * 3 * r * r..(i + 1) * 3 * r * r], 3, r, (r + 2, i * (r + 2)), (-1.0, 1.0));
    }
    // Shown at ≥ 96 px per image, as the validation grids.
    save_grid(&out.upscaled((96 / r).max(1)), &a.output)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// The toy reads `"<colour> circle with <colour> background"` with palette colours (any
/// case); anything else here is a typo worth an error rather than a null prompt.
fn check_toy_prompt(prompt: &str) -> Result<()> {
    let colours = prompt_colours(prompt)?;
    if colours.iter().any(Option::is_none) {
        let names: Vec<_> = PALETTE.iter().map(|(n, _)| *n).collect();
        bail!("prompt {prompt:?} names a colour outside the palette ({})", names.join(", "));
    }
    Ok(())
}
