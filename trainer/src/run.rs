//! What every training run shares: the seeded random stream and data order (the part of
//! the state a checkpoint must restore), and the noising of a batch (docs/method.md §3.1–3.2).

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::rng::{philox4x32_10, uniform_open};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, DualDenoiser};
use crate::optim::{OptimConfig, Optimizer};
use crate::scheduler::{NoiseProcess, add_noise};

/// A training run: the model, its optimizer, the settings `C`, the random stream with the
/// data position, and the noise process. Control training ([`crate::train::Trainer`]) and
/// prior pretraining ([`crate::pretrain::Pretrainer`]) are its two kinds.
pub struct TrainingRun<B: Backend, C> {
    /// The model.
    pub model: Box<dyn DualDenoiser<B>>,
    /// AdamW moments and the EMA.
    pub optimizer: Optimizer<B>,
    /// The run's settings.
    pub config: C,
    /// Random stream, data order and step: the resumable position of the run.
    pub run: RunStream,
    /// Identifies the run in its checkpoints (a run prunes only its own).
    pub run_id: String,
    pub(crate) noise: NoiseProcess,
    /// Control training's per-timestep scale of `τ`, once measured (never in pretraining).
    pub(crate) tau_norm: Option<crate::objective::TauNorm>,
}

/// A fresh run id: the time and the process, hashed (not a source of model randomness).
pub(crate) fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// What the optimizer step of a run reads from its settings (the one copy of them).
pub trait StepSettings {
    /// AdamW and the lr schedule.
    fn optim(&self) -> &OptimConfig;
    /// Steps of the run (the length of the lr schedule).
    fn total_steps(&self) -> u64;
}

/// The most examples per (micro-)batch and micro-batches per step any run takes.
pub const MAX_BATCH: usize = 1 << 20;

impl<B: Backend, C: StepSettings> TrainingRun<B, C> {
    /// Clips and applies `grads` as the run's next optimizer step and advances the step
    /// count. Returns `(gradient norm, lr)`. A step whose update makes a weight non-finite
    /// is an error naming the step, the tensor and the learning rate (the run should not be
    /// saved after it).
    pub(crate) fn apply(&mut self, grads: &mut [Option<B::Tensor>]) -> Result<(f32, f32)> {
        let done = self.run.state.step;
        let (config, store) = (&self.config, self.model.store_mut());
        let (norm, lr) = self.optimizer.step(store, grads, config.optim(), done, config.total_steps())?;
        // One reduction (one read-back) for all weights; the culprit is searched only on failure.
        let store = self.model.store();
        let mut total: Option<B::Tensor> = None;
        for (_, p) in store.iter().filter(|(_, p)| p.trainable) {
            let sq = B::sum_squares(&p.value)?;
            total = Some(match total {
                Some(t) => B::add(&t, &sq)?,
                None => sq,
            });
        }
        if let Some(t) = total
            && !B::item(&t)?.is_finite()
        {
            let mut culprit = String::from("a weight");
            for (_, p) in store.iter().filter(|(_, p)| p.trainable) {
                if !B::item(&B::sum_squares(&p.value)?)?.is_finite() {
                    culprit = p.name.clone();
                    break;
                }
            }
            return Err(TrainError::Diverged { step: done + 1, tensor: culprit, lr, grad_norm: norm });
        }
        self.run.state.step = done + 1;
        Ok((norm, lr))
    }
}

impl<B: Backend, C> TrainingRun<B, C> {
    /// The next `n` examples of `data` in the run's order (an error, not a panic, if the data
    /// position lies past the end of `data`).
    pub(crate) fn next_examples(&mut self, data: &dyn crate::data::Dataset, n: usize) -> Result<Vec<Example>> {
        self.run.next_indices(data.len(), n)?.into_iter().map(|i| data.get(i)).collect()
    }
}

/// Where a run is: everything besides weights and moments that resuming needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    /// Counter of the run's random stream (each draw consumes one value).
    pub rng_counter: u64,
    /// Data epoch.
    pub epoch: u64,
    /// Position inside the epoch's permutation.
    pub position: usize,
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
    let n = examples.len();
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
    let drop_prompt = if null_prompt_prob > 0.0 {
        stream.uniforms(n).into_iter().map(|v| v < null_prompt_prob).collect()
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
        None => stream.uniforms(n),
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
    let eps = B::random_normal(&shape, stream.next_seed(), DType::F32, &device)?;
    let x_t = add_noise::<B>(&x0, &eps, |l| (l.alpha, l.sigma), &levels)?;
    let kind = model.prediction();
    let y = add_noise::<B>(&x0, &eps, |l| kind.coefficients(*l), &levels)?;
    Ok(NoisedBatch { x_t, y, hint, levels, cond: Conditioning { t: t_embed, prompt } })
}
