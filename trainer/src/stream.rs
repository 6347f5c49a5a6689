//! The seeded random stream and data order of a run (the part of its state a checkpoint
//! must restore), and the noising of a batch (docs/method.md §3.1–3.2).

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::rng::{philox4x32_10, uniform_open};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::distributed::Shard;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, DualDenoiser};
use crate::scheduler::{NoiseProcess, add_noise};

/// Where a run is: everything besides weights and moments that resuming needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed loop steps (optimizer steps, plus those skipped under loss scaling).
    pub step: u64,
    /// Counter of the run's random stream (each draw consumes one value).
    pub rng_counter: u64,
    /// Data epoch.
    pub epoch: u64,
    /// Position inside the epoch's permutation.
    pub position: usize,
    /// Where fp16 loss scaling stands (None: the run does not scale its loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<lisa_core::loss_scale::LossScaleState>,
    /// Steps skipped for an inf/NaN gradient under loss scaling. The lr schedule, AdamW and
    /// the EMA count only the steps taken (accelerate skips its scheduler step too).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: u64,
    /// The ranks of the data-parallel run that took the steps (1: a run alone). Each step
    /// draws a global batch of `ranks × batch_size` examples, so a resume keeps the number.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub ranks: u64,
}

impl Default for TrainState {
    fn default() -> Self {
        Self { step: 0, rng_counter: 0, epoch: 0, position: 0, loss_scale: None, skipped_steps: 0, ranks: 1 }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn one() -> u64 {
    1
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

/// The run's random stream and data order: pure functions of `(seed, state)`.
#[derive(Debug, Clone)]
pub struct RunStream {
    seed: u64,
    /// The resumable position.
    pub state: TrainState,
    permutation: (u64, Vec<usize>),
}

impl RunStream {
    /// A fresh stream.
    pub fn new(seed: u64) -> Self {
        Self { seed, state: TrainState::default(), permutation: (u64::MAX, Vec::new()) }
    }

    /// The next 64-bit seed (Philox of the counter).
    pub fn next_seed(&mut self) -> u64 {
        let c = self.state.rng_counter;
        self.state.rng_counter += 1;
        let r = philox4x32_10([c as u32, (c >> 32) as u32, 0x5eed, 0], [self.seed as u32, (self.seed >> 32) as u32]);
        (r[0] as u64) << 32 | r[1] as u64
    }

    /// Advances the stream past `count` draws without taking them.
    pub(crate) fn skip_draws(&mut self, count: u64) {
        self.state.rng_counter += count;
    }

    /// `n` uniforms in (0, 1).
    pub fn uniforms(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| uniform_open(self.next_seed() as u32)).collect()
    }

    /// The next `n` example indices: a seeded permutation per epoch, wrapping into the next.
    pub fn next_indices(&mut self, data_len: usize, n: usize) -> Result<Vec<usize>> {
        if data_len == 0 {
            return Err(TrainError::Mismatch("the dataset is empty".into()));
        }
        if self.state.position >= data_len {
            return Err(TrainError::Mismatch(format!(
                "the run is at example {} of an epoch, but the dataset has {data_len}",
                self.state.position
            )));
        }
        let mut out = Vec::with_capacity(n.min(data_len));
        while out.len() < n {
            if self.permutation.0 != self.state.epoch || self.permutation.1.len() != data_len {
                let mut p: Vec<usize> = (0..data_len).collect();
                for i in (1..data_len).rev() {
                    let r = philox4x32_10(
                        [i as u32, self.state.epoch as u32, 0xda7a, 0],
                        [self.seed as u32, (self.seed >> 32) as u32],
                    );
                    p.swap(i, (r[0] as usize) % (i + 1));
                }
                self.permutation = (self.state.epoch, p);
            }
            out.push(self.permutation.1[self.state.position]);
            self.state.position += 1;
            if self.state.position == data_len {
                self.state.position = 0;
                self.state.epoch += 1;
            }
        }
        Ok(out)
    }
}

/// A noised batch on the device: `x_t = α·x₀ + σ·ε`, the target `y`, and the conditioning.
pub struct NoisedBatch<B: Backend> {
    /// `[n, c, r, r]`.
    pub x_t: B::Tensor,
    /// The prediction target (ε, v, x₀ or u), `[n, c, r, r]`.
    pub y: B::Tensor,
    /// `[n, c_hint, r, r]`, when hints were asked for.
    pub hint: Option<B::Tensor>,
    /// One level per sample.
    pub levels: Vec<NoiseLevel<f32>>,
    /// Timesteps and prompts.
    pub cond: Conditioning,
}

/// Noises `examples` for `model` (with its condition images when `with_hints`, none for
/// the main model alone). With probability `null_prompt_prob` a sample's prompt is replaced
/// by the empty (null) prompt (classifier-free guidance training).
pub fn noise_batch<B: Backend>(
    stream: &mut RunStream,
    noise: &NoiseProcess,
    model: &dyn DualDenoiser<B>,
    with_hints: bool,
    examples: &[Example],
    null_prompt_prob: f32,
) -> Result<NoisedBatch<B>> {
    noise_batch_at(stream, noise, model, with_hints, examples, null_prompt_prob, None)
}

/// [`noise_batch`] with the timesteps' uniform draws given (`Some`, one per example, each in
/// `[0, 1)`: [`NoiseProcess::draw`] maps them to timesteps monotonically) instead of drawn
/// from `stream`; the noise still comes from `stream`.
pub fn noise_batch_at<B: Backend>(
    stream: &mut RunStream,
    noise: &NoiseProcess,
    model: &dyn DualDenoiser<B>,
    with_hints: bool,
    examples: &[Example],
    null_prompt_prob: f32,
    t_uniforms: Option<&[f32]>,
) -> Result<NoisedBatch<B>> {
    noise_shard(stream, noise, model, with_hints, examples, null_prompt_prob, t_uniforms, Shard::WHOLE)
}

/// The draws [`noise_batch`] takes from the stream for a global batch of `n` examples: one
/// uniform per example for the null prompt (when `null_prompt_prob > 0`), one per example
/// for the timestep, one seed for the noise. A micro-batch skipped under loss scaling
/// advances the stream by as much, so that every rank of a data-parallel run stays in step.
pub(crate) fn noise_draws(n: usize, null_prompt_prob: f32) -> u64 {
    (if null_prompt_prob > 0.0 { n as u64 } else { 0 }) + n as u64 + 1
}

/// [`noise_batch_at`] for rank `shard.rank` of a data-parallel run: `examples` are its rows
/// ([`Shard::rows`]) of a global batch of `shard.world × examples.len()`, and every draw is
/// the global batch's (the same on every rank), of which it keeps its rows. With
/// [`Shard::WHOLE`] this is [`noise_batch_at`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn noise_shard<B: Backend>(
    stream: &mut RunStream,
    noise: &NoiseProcess,
    model: &dyn DualDenoiser<B>,
    with_hints: bool,
    examples: &[Example],
    null_prompt_prob: f32,
    t_uniforms: Option<&[f32]>,
    shard: Shard,
) -> Result<NoisedBatch<B>> {
    let n = examples.len();
    let global = n * shard.world;
    let rows = shard.rows(n);
    if t_uniforms.is_some_and(|u| u.len() != n || u.iter().any(|v| !(0.0..1.0).contains(v))) {
        return Err(TrainError::Mismatch(format!("noise_batch_at wants {n} timestep draws in [0, 1)")));
    }
    let [c, h, w] = model.sample_shape();
    let hint_shape = with_hints.then(|| model.hint_shape());
    let mut image = Vec::with_capacity(n * c * h * w);
    let mut hint = Vec::with_capacity(n * hint_shape.map_or(0, |[hc, hh, hw]| hc * hh * hw));
    let fits = |what: &str, values: &[f32], [channels, h, w]: [usize; 3]| {
        let want = channels * h * w;
        if values.len() == want {
            return Ok(());
        }
        Err(TrainError::Mismatch(format!(
            "an example {what} has {} values, the model wants {channels}×{h}×{w} = {want}",
            values.len()
        )))
    };
    for e in examples {
        fits("image", &e.image, [c, h, w])?;
        image.extend_from_slice(&e.image);
        if let Some(hs) = hint_shape {
            fits("condition image", &e.hint, hs)?;
            hint.extend_from_slice(&e.hint);
        }
    }
    let drop_prompt: Vec<bool> = if null_prompt_prob > 0.0 {
        stream.uniforms(global)[rows.clone()].iter().map(|&v| v < null_prompt_prob).collect()
    } else {
        vec![false; n]
    };
    let prompts: Vec<&str> =
        examples.iter().zip(&drop_prompt).map(|(e, &drop)| if drop { "" } else { e.prompt.as_str() }).collect();
    let prompt = model.embed_prompts(&prompts)?;
    let mut t_embed = Vec::with_capacity(n);
    let mut levels = Vec::with_capacity(n);
    let draws = match t_uniforms {
        Some(u) => u.to_vec(),
        None => stream.uniforms(global)[rows.clone()].iter().map(|&v| noise.position(v)).collect(),
    };
    for v in draws {
        let (t, level) = noise.draw(v)?;
        t_embed.push(t);
        levels.push(level);
    }
    let device = model.store().device().clone();
    let shape = Shape::new([n, c, h, w]);
    let x0 = B::from_slice(&image, &shape, DType::F32, &device)?;
    let hint = match hint_shape {
        Some([hc, hh, hw]) => Some(B::from_slice(&hint, &Shape::new([n, hc, hh, hw]), DType::F32, &device)?),
        None => None,
    };
    // The global batch's noise, of which this rank keeps its rows (Philox: element i of a
    // seed's stream does not depend on the tensor's size).
    let eps = match shard.world {
        1 => B::random_normal(&shape, stream.next_seed(), DType::F32, &device)?,
        _ => {
            let all = B::random_normal(&Shape::new([global, c, h, w]), stream.next_seed(), DType::F32, &device)?;
            B::narrow(&all, 0, rows.start, n)?
        }
    };
    let x_t = add_noise::<B>(&x0, &eps, |l| (l.alpha, l.sigma), &levels)?;
    let kind = model.prediction();
    let y = add_noise::<B>(&x0, &eps, |l| kind.coefficients(*l), &levels)?;
    Ok(NoisedBatch { x_t, y, hint, levels, cond: Conditioning { t: t_embed, prompt } })
}
