//! How much of the LISA target the model explains, per timestep bucket.
//!
//! LISA regresses the decoder output `D(h, t)` onto `τ = s_t·(y − M(x_t))`, the part of the
//! target the prior `M` (the main network without residuals) misses. Two shares of `τ`, each
//! measured with the run's own LISA distance `d` (weights and target space included):
//!
//! - the decoder's: `1 − d(D(h, t), τ) / d(0, τ)`, what LISA's auxiliary head explains;
//! - the control's: `1 − d(s_t·(M(x_t; r) − M(x_t)), τ) / d(0, τ)`, what the side network's
//!   residuals `r` explain, i.e. how much of `τ` a model that sees the condition does remove.
//!
//! Both are 0 for an output of zeros and 1 for a perfect one; `d(0, τ)` is reported too (for the
//! MSE distance, the weighted mean of `τ²`). The timesteps are split into equal buckets of the
//! schedule; every bucket noises the same examples with noise fixed by a seed, so two calls on
//! the same model give the same numbers, and two models are compared on the same draws.

use lisa_core::LisaConfig;
use lisa_core::backend::Backend;

use crate::autodiff::Tape;
use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::objective::{TauNorm, bucket_batch, in_tau_units, lisa_terms};
use crate::scheduler::{NoiseConfig, NoiseProcess};

/// The shares of `τ` in one bucket of timesteps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauShare {
    /// The bucket's range as fractions of the schedule, `[from, to)` (diffusion: `t/T`).
    pub from: f32,
    /// See `from`.
    pub to: f32,
    /// `d(0, τ)`: the distance of an all-zero output.
    pub zero_distance: f32,
    /// `1 − d(D(h, t), τ) / d(0, τ)`; `None` for a model built without the decoder.
    pub decoder: Option<f32>,
    /// `1 − d(s_t·(M(x_t; r) − M(x_t)), τ) / d(0, τ)`.
    pub control: f32,
}

/// The shares of `τ` on `examples` in `buckets` equal buckets of timesteps (module docs);
/// `seed` fixes the timesteps within each bucket and the noise. `norm`: the run's per-timestep
/// normalisation of `τ`, when it has one (the decoder predicts in those units).
pub fn tau_shares<B: Backend>(
    model: &dyn DualDenoiser<B>,
    lisa: &LisaConfig,
    noise: &NoiseConfig,
    norm: Option<&TauNorm>,
    examples: &[Example],
    buckets: usize,
    seed: u64,
) -> Result<Vec<TauShare>> {
    if buckets == 0 || examples.is_empty() {
        return Err(TrainError::Config(format!(
            "τ shares need at least one bucket and one example (got {buckets} and {})",
            examples.len()
        )));
    }
    let process = NoiseProcess::new(noise)?;
    let kind = model.prediction();
    (0..buckets)
        .map(|b| {
            let (from, to) = (b as f32 / buckets as f32, (b + 1) as f32 / buckets as f32);
            let batch = bucket_batch::<B>(&process, model, examples, (from, to), seed.wrapping_add(b as u64), true)?;
            let hint = batch.hint.ok_or(TrainError::Internal("noise_batch_at returns the hints it was asked for"))?;
            let tape = Tape::<B>::new();
            let p = model.store().bind(&tape);
            let cond = &batch.cond;
            // [n, c, h, w] each: controlled prediction, prior prediction, decoder output.
            let (pred, prior, decoded) = tape.no_grad(|| -> Result<_> {
                let (x, hint) = (tape.constant(batch.x_t.clone()), tape.constant(hint));
                let enc = model.encode_main(&p, &x, cond)?;
                let side = model.side(&p, &x, &hint, cond)?;
                let pred = model.decode_main(&p, &enc, Some((&side.residuals, model.conditioning_scale())))?;
                let prior = model.decode_main(&p, &enc, None)?;
                let decoded = match model.lisa_hook() {
                    Some(hook) => Some(model.decode_lisa(&p, side.feature(hook)?, &cond.t)?.value),
                    None => None,
                };
                Ok((pred.value, prior.value, decoded))
            })?;
            let terms = lisa_terms(lisa, kind, &batch.levels, norm)?;
            // s_t·(pred − prior), per sample: the residuals' effect in τ's units (the terms
            // above were computed from the same levels, so the NaN fallback never applies).
            let control_out = in_tau_units::<B>(&pred, &prior, lisa, kind, norm, &batch.levels)?;
            let (control, _) = B::lisa_loss(lisa, &terms, &control_out, &batch.y, &prior)?;
            let zero = control.zero_distance;
            let share = |distance: f32| if zero > 0.0 { 1.0 - distance / zero } else { f32::NAN };
            let decoder = match &decoded {
                Some(d) => Some(share(B::lisa_loss(lisa, &terms, d, &batch.y, &prior)?.0.distance)),
                None => None,
            };
            Ok(TauShare { from, to, zero_distance: zero, decoder, control: share(control.distance) })
        })
        .collect()
}
