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

use lisa_core::backend::Backend;
use lisa_core::{LisaConfig, NoiseLevel};

use crate::autodiff::Tape;
use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::DualDenoiser;
use crate::run::{NoisedBatch, RunStream, noise_batch_at};
use crate::scheduler::{NoiseConfig, NoiseProcess, add_noise};
use crate::tau_norm::{TauNorm, TauNormConfig, lisa_terms};

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
            let hint = batch.hint.ok_or(TrainError::Autodiff("noise_batch_at returns the hints it was asked for"))?;
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

/// `examples` noised at timesteps drawn uniformly inside the bucket `[from, to)` of the
/// schedule (fractions), draws and noise from a stream seeded with `seed`; with the condition
/// images when `with_hints`.
pub(crate) fn bucket_batch<B: Backend>(
    process: &NoiseProcess,
    model: &dyn DualDenoiser<B>,
    examples: &[Example],
    (from, to): (f32, f32),
    seed: u64,
    with_hints: bool,
) -> Result<NoisedBatch<B>> {
    let mut stream = RunStream::new(seed);
    // Draws inside [from, to), kept below `to` in f32.
    let draws: Vec<f32> =
        stream.uniforms(examples.len()).into_iter().map(|v| (from + v * (to - from)).min(to.next_down())).collect();
    noise_batch_at(&mut stream, process, model, with_hints, examples, 0.0, Some(&draws))
}

/// Offsets the τ-scale measurement's seeds from the run's (its draws are not the training draws).
const TAU_NORM_SEED_OFFSET: u64 = 0x7461_755f_6e6f_726d;

/// Measures `τ`'s root mean square per bucket of timesteps on `examples`, in chunks of `chunk`
/// examples per forward pass, for [`TauNorm`] (crate::tau_norm's docs): every bucket noises
/// the same examples with its own draws and noise, seeded from `seed`.
pub fn measure_tau_norm<B: Backend>(
    model: &dyn DualDenoiser<B>,
    lisa: &LisaConfig,
    process: &NoiseProcess,
    examples: &[Example],
    config: &TauNormConfig,
    chunk: usize,
    seed: u64,
) -> Result<TauNorm> {
    config.validate()?;
    if examples.is_empty() || chunk == 0 {
        return Err(TrainError::Config("measuring τ's scale needs at least one example".into()));
    }
    let kind = model.prediction();
    let buckets = config.buckets;
    let chunks = examples.len().div_ceil(chunk);
    let mut sigma_from = Vec::with_capacity(buckets);
    let mut rms = Vec::with_capacity(buckets);
    for b in 0..buckets {
        let range = (b as f32 / buckets as f32, (b + 1) as f32 / buckets as f32);
        sigma_from.push(process.draw(range.0)?.1.sigma);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (i, part) in examples.chunks(chunk).enumerate() {
            let stream_seed = seed.wrapping_add(TAU_NORM_SEED_OFFSET).wrapping_add((b * chunks + i) as u64);
            let batch = bucket_batch::<B>(process, model, part, range, stream_seed, false)?;
            let tape = Tape::<B>::new();
            let p = model.store().bind(&tape);
            // [n, c, h, w]: the prior's prediction.
            let prior = tape.no_grad(|| -> Result<_> {
                let x = tape.constant(batch.x_t.clone());
                let enc = model.encode_main(&p, &x, &batch.cond)?;
                Ok(model.decode_main(&p, &enc, None)?.value)
            })?;
            // τ = s_t·(y − prior), [n, c, h, w].
            let tau = in_tau_units::<B>(&batch.y, &prior, lisa, kind, None, &batch.levels)?;
            sum += B::item(&B::sum_squares(&tau)?)? as f64;
            count += B::shape(&tau).num_elements()?;
        }
        rms.push((sum / count as f64).sqrt() as f32);
    }
    TauNorm::new(sigma_from, rms)
}

/// `s_b·(a − b)` per sample `[n, …]`: a difference from the prior in τ's units (the target
/// scale of [`LisaConfig::sample_terms`], divided by τ's scale at the level when `norm` is
/// given, as [`lisa_terms`] does). A level the terms reject gives NaN, which neither caller
/// lets through: [`tau_shares`] computes the same levels' terms first (an error there), and a
/// NaN scale is refused by [`TauNorm::new`].
fn in_tau_units<B: Backend>(
    a: &B::Tensor,
    b: &B::Tensor,
    lisa: &LisaConfig,
    kind: lisa_core::Prediction,
    norm: Option<&TauNorm>,
    levels: &[NoiseLevel<f32>],
) -> Result<B::Tensor> {
    let scale = |l: &NoiseLevel<f32>| {
        let s = lisa.sample_terms(kind, *l).map_or(f32::NAN, |t| t.target_scale);
        norm.map_or(s, |n| s * n.factor(l))
    };
    add_noise::<B>(a, b, |l| (scale(l), -scale(l)), levels)
}
