//! `lisa sample`.

use std::path::PathBuf;

use clap::Args;
use lisa_core::backend::Backend;
use lisa_core::backend::{DType, Shape};
use lisa_trainer::data::{NULL_ID, PALETTE};
use lisa_trainer::image::{Resample, Rgb8, read_png};
use lisa_trainer::sample::{Sampler, sample};

use crate::eval::ModelArgs;

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
    /// ddim | ddpm | euler.
    #[arg(long, default_value = "ddim")]
    sampler: String,
    /// DDIM η.
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Sampling steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Residual multiplier.
    #[arg(long, default_value_t = 1.0)]
    control_scale: f32,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long, default_value_t = 1.0)]
    guidance_scale: f32,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `"red circle with blue background"` → `[fill id, background id]`.
pub fn parse_prompt(prompt: &str) -> Result<[usize; 2], String> {
    let id = |name: &str| {
        PALETTE.iter().position(|(n, _)| *n == name).ok_or_else(|| {
            let names: Vec<_> = PALETTE.iter().map(|(n, _)| *n).collect();
            format!("unknown colour {name:?} in prompt (known: {})", names.join(", "))
        })
    };
    let words: Vec<&str> = prompt.split_whitespace().collect();
    match words.as_slice() {
        [fill, "circle", "with", bg, "background"] => Ok([id(fill)?, id(bg)?]),
        [] => Ok([NULL_ID, NULL_ID]),
        _ => Err(format!("prompt {prompt:?} is not \"<colour> circle with <colour> background\"")),
    }
}

/// Runs `lisa sample`.
pub fn run<B: Backend>(a: SampleArgs, device: B::Device) -> Result<(), String> {
    let ids = parse_prompt(&a.prompt)?;
    let (mut file, model) = a.model.load::<B>(device)?;
    let s = &mut file.validation.sampling;
    s.sampler = match a.sampler.as_str() {
        "ddim" => Sampler::Ddim { eta: a.eta },
        "ddpm" => Sampler::Ddpm,
        "euler" => Sampler::Euler,
        other => return Err(format!("unknown sampler {other:?}: ddim | ddpm | euler")),
    };
    (s.steps, s.control_scale, s.guidance_scale, s.seed) = (a.steps, a.control_scale, a.guidance_scale, a.seed);
    let r = model.config.unet.resolution;
    let n = a.condition.len();
    let mut hints = Vec::with_capacity(n * r * r);
    for path in &a.condition {
        hints.extend(read_png(path, r, true, Resample::Max).map_err(|e| e.to_string())?);
    }
    let hint = B::from_slice(&hints, &Shape::new([n, 1, r, r]), DType::F32, model.store.device())
        .map_err(|e| e.to_string())?;
    let prompts = vec![vec![ids[0]; n], vec![ids[1]; n]];
    let images =
        sample(&model, &file.train.noise, &hint, &prompts, &file.validation.sampling).map_err(|e| e.to_string())?;
    let images = B::to_vec(&images).map_err(|e| e.to_string())?;
    let mut out = Rgb8::new(2 * (r + 2), n * (r + 2));
    for i in 0..n {
        out.paste_planar(&hints[i * r * r..(i + 1) * r * r], 1, r, (0, i * (r + 2)), (0.0, 1.0));
        out.paste_planar(&images[i * 3 * r * r..(i + 1) * 3 * r * r], 3, r, (r + 2, i * (r + 2)), (-1.0, 1.0));
    }
    out.save_png(&a.output).map_err(|e| e.to_string())?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
