//! What every training run shares: the seeded random stream and data order (the part of
//! the state a checkpoint must restore), and the noising of a batch (lisa-method.md §3.1–2).

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::rng::{philox4x32_10, uniform_open};
use lisa_core::schedule::{DiscreteVp, RectifiedFlow};
use serde::{Deserialize, Serialize};

use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::{Conditioning, UNetConfig};
use crate::train::NoiseConfig;

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
            return Err(TrainError::Config("the dataset is empty".into()));
        }
        let mut out = Vec::with_capacity(n);
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

/// The forward process, prepared.
pub enum NoiseProcess {
    /// Discrete VP diffusion.
    Diffusion(DiscreteVp<f32>),
    /// Rectified flow.
    Flow(RectifiedFlow),
}

impl NoiseProcess {
    /// Prepares `config`.
    pub fn new(config: &NoiseConfig) -> Result<Self> {
        Ok(match *config {
            NoiseConfig::Diffusion { betas, num_train_timesteps } => {
                NoiseProcess::Diffusion(DiscreteVp::new(betas, num_train_timesteps)?)
            }
            NoiseConfig::Flow { shift } => NoiseProcess::Flow(RectifiedFlow { shift }),
        })
    }

    /// `(timestep embedding value, level)` for a uniform draw `u`: `t = ⌊u·T⌋` (diffusion),
    /// `t = u` embedded as 1000·t (flow).
    pub fn draw(&self, u: f32) -> Result<(f32, NoiseLevel<f32>)> {
        match self {
            NoiseProcess::Diffusion(s) => {
                let t = ((u * s.num_train_timesteps() as f32) as usize).min(s.num_train_timesteps() - 1);
                Ok((t as f32, s.level(t)?))
            }
            NoiseProcess::Flow(f) => Ok((1000.0 * u, f.level(u)?)),
        }
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

/// Noises `examples` for a model of shape `u` (with hints of `hint_channels` channels, or
/// none for the main model alone). With probability
/// `null_prompt_prob` a sample's prompt ids are all replaced by the null ids (classifier-free
/// guidance training).
pub fn noise_batch<B: Backend>(
    stream: &mut RunStream,
    noise: &NoiseProcess,
    u: &UNetConfig,
    hint_channels: Option<usize>,
    examples: &[Example],
    null_prompt_prob: f32,
    device: &B::Device,
) -> Result<NoisedBatch<B>> {
    let n = examples.len();
    let (c, r) = (u.image_channels, u.resolution);
    let mut image = Vec::with_capacity(n * c * r * r);
    let mut hint = Vec::with_capacity(n * hint_channels.unwrap_or(0) * r * r);
    for e in examples {
        if e.image.len() != c * r * r {
            return Err(TrainError::Config(format!(
                "example image has {} values, the model wants {}",
                e.image.len(),
                c * r * r
            )));
        }
        image.extend_from_slice(&e.image);
        if let Some(hc) = hint_channels {
            if e.hint.len() != hc * r * r {
                return Err(TrainError::Config(format!(
                    "example hint has {} values, the model wants {}",
                    e.hint.len(),
                    hc * r * r
                )));
            }
            hint.extend_from_slice(&e.hint);
        }
    }
    let drop_prompt = if null_prompt_prob > 0.0 {
        stream.uniforms(n).into_iter().map(|v| v < null_prompt_prob).collect()
    } else {
        vec![false; n]
    };
    let prompts: Vec<Vec<usize>> = (0..u.prompt_classes.len())
        .map(|k| {
            let null = u.prompt_classes[k] - 1;
            examples
                .iter()
                .zip(&drop_prompt)
                .map(|(e, &drop)| if drop { null } else { e.prompt.get(k).copied().unwrap_or(null) })
                .collect()
        })
        .collect();
    let mut t_embed = Vec::with_capacity(n);
    let mut levels = Vec::with_capacity(n);
    for v in stream.uniforms(n) {
        let (t, level) = noise.draw(v)?;
        t_embed.push(t);
        levels.push(level);
    }
    let shape = Shape::new([n, c, r, r]);
    let x0 = B::from_slice(&image, &shape, DType::F32, device)?;
    let hint = match hint_channels {
        Some(hc) => Some(B::from_slice(&hint, &Shape::new([n, hc, r, r]), DType::F32, device)?),
        None => None,
    };
    let eps = B::random_normal(&shape, stream.next_seed(), DType::F32, device)?;
    // Per-sample scalars broadcast over [n, 1, 1, 1].
    let per_sample = |f: &dyn Fn(&NoiseLevel<f32>) -> f32| {
        B::from_slice(&levels.iter().map(f).collect::<Vec<_>>(), &Shape::new([n, 1, 1, 1]), DType::F32, device)
    };
    let x_t = B::add(&B::mul(&x0, &per_sample(&|l| l.alpha)?)?, &B::mul(&eps, &per_sample(&|l| l.sigma)?)?)?;
    let kind = u.prediction;
    let y = B::add(
        &B::mul(&x0, &per_sample(&|l| kind.coefficients(*l).0)?)?,
        &B::mul(&eps, &per_sample(&|l| kind.coefficients(*l).1)?)?,
    )?;
    Ok(NoisedBatch { x_t, y, hint, levels, cond: Conditioning { t: t_embed, prompts } })
}
