use alloc::format;
use alloc::vec::Vec;

use super::NoiseLevel;
use crate::real::Real;
use crate::{Error, Result};

/// The β schedules of diffusers' `DDPMScheduler` (`beta_schedule=`).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BetaSchedule {
    /// `β_i = linspace(start, end, T)[i]` (DDPM: 1e-4 .. 0.02).
    Linear {
        /// β at the first step.
        start: f64,
        /// β at the last step.
        end: f64,
    },
    /// `β_i = linspace(√start, √end, T)[i]²` (Stable Diffusion: 0.00085 .. 0.012).
    ScaledLinear {
        /// β at the first step.
        start: f64,
        /// β at the last step.
        end: f64,
    },
    /// Improved-DDPM cosine: `β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta)` with
    /// `ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)`; diffusers clips at `max_beta = 0.999`.
    SquaredCosCapV2 {
        /// Upper clip of β (0.999 in diffusers).
        max_beta: f64,
    },
}

impl BetaSchedule {
    /// DDPM's linear schedule, 1e-4 .. 0.02.
    pub const DDPM_LINEAR: Self = BetaSchedule::Linear { start: 1e-4, end: 0.02 };
    /// Stable Diffusion's scaled-linear schedule, 0.00085 .. 0.012.
    pub const SD_SCALED_LINEAR: Self = BetaSchedule::ScaledLinear { start: 0.00085, end: 0.012 };
    /// `squaredcos_cap_v2` with diffusers' clip 0.999.
    pub const COSINE: Self = BetaSchedule::SquaredCosCapV2 { max_beta: 0.999 };

    /// The `num_steps` betas: linear and scaled-linear computed in `F` (diffusers computes
    /// them in float32), `squaredcos_cap_v2` in f64 and cast (diffusers: Python floats).
    pub fn betas<F: Real>(&self, num_steps: usize) -> Result<Vec<F>> {
        const OP: &str = "BetaSchedule::betas";
        if num_steps == 0 {
            return Err(Error::Empty { op: OP });
        }
        // linspace(a, b, n)[i] = a + (b − a)·i/(n − 1), and [a] for n = 1 (as torch).
        let linspace = |a: F, b: F, i: usize| {
            if num_steps == 1 { a } else { a + (b - a) * F::lit(i as f64) / F::lit((num_steps - 1) as f64) }
        };
        let betas: Vec<F> = match *self {
            BetaSchedule::Linear { start, end } => {
                check_beta_range(OP, start, end)?;
                (0..num_steps).map(|i| linspace(F::lit(start), F::lit(end), i)).collect()
            }
            BetaSchedule::ScaledLinear { start, end } => {
                check_beta_range(OP, start, end)?;
                let (a, b) = (F::lit(start).sqrt(), F::lit(end).sqrt());
                (0..num_steps)
                    .map(|i| {
                        let s = linspace(a, b, i);
                        s * s
                    })
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 { max_beta } => {
                if !(max_beta > 0.0 && max_beta < 1.0) {
                    return Err(Error::invalid(OP, format!("max_beta must lie in (0, 1), got {max_beta}")));
                }
                // In f64 and then cast, as diffusers' betas_for_alpha_bar (Python floats).
                let alpha_bar = |s: f64| {
                    let c = num_traits::Float::cos((s + 0.008) / 1.008 * core::f64::consts::FRAC_PI_2);
                    c * c
                };
                let n = num_steps as f64;
                (0..num_steps)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
                        F::lit((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta))
                    })
                    .collect()
            }
        };
        Ok(betas)
    }
}

fn check_beta_range(op: &'static str, start: f64, end: f64) -> Result<()> {
    let ok = |b: f64| b > 0.0 && b < 1.0;
    if ok(start) && ok(end) {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("betas must lie in (0, 1), got start={start}, end={end}")))
    }
}

/// A discrete VP schedule over `T` training steps (diffusers' `alphas_cumprod`):
/// `ᾱ_t = ∏_{s=0}^{t} (1 − β_s)`, `α_t = √ᾱ_t`, `σ_t = √(1 − ᾱ_t)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscreteVp<F> {
    betas: Vec<F>,
    alphas_cumprod: Vec<F>,
}

impl<F: Real> DiscreteVp<F> {
    /// Builds the schedule for `num_train_timesteps` steps (1000 in diffusers).
    pub fn new(schedule: BetaSchedule, num_train_timesteps: usize) -> Result<Self> {
        let betas = schedule.betas::<F>(num_train_timesteps)?;
        let mut acc = F::one();
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc = acc * (F::one() - b);
                acc
            })
            .collect();
        Ok(Self { betas, alphas_cumprod })
    }

    /// The number of training steps `T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// `β_t` for every step.
    pub fn betas(&self) -> &[F] {
        &self.betas
    }

    /// `ᾱ_t` for every step (strictly decreasing).
    pub fn alphas_cumprod(&self) -> &[F] {
        &self.alphas_cumprod
    }

    fn checked(&self, t: usize) -> Result<F> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::invalid("DiscreteVp", format!("timestep {t} out of range 0..{}", self.alphas_cumprod.len()))
        })
    }

    /// `α_t = √ᾱ_t`.
    pub fn alpha(&self, t: usize) -> Result<F> {
        Ok(self.checked(t)?.sqrt())
    }

    /// `σ_t = √(1 − ᾱ_t)`.
    pub fn sigma(&self, t: usize) -> Result<F> {
        Ok((F::one() - self.checked(t)?).sqrt())
    }

    /// `SNR_t = ᾱ_t / (1 − ᾱ_t)`.
    pub fn snr(&self, t: usize) -> Result<F> {
        let a = self.checked(t)?;
        Ok(a / (F::one() - a))
    }

    /// The [`NoiseLevel`] `(α_t, σ_t)` at step `t`.
    pub fn level(&self, t: usize) -> Result<NoiseLevel<F>> {
        NoiseLevel::new(self.alpha(t)?, self.sigma(t)?)
    }

    /// `x_t = α_t·x₀ + σ_t·ε` for one element.
    pub fn add_noise(&self, x0: F, eps: F, t: usize) -> Result<F> {
        Ok(self.level(t)?.add_noise(x0, eps))
    }

    /// `v_t = α_t·ε − σ_t·x₀` for one element (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: F, eps: F, t: usize) -> Result<F> {
        Ok(self.level(t)?.velocity(x0, eps))
    }
}
