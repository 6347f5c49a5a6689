//! The forward process: how training draws a timestep and noises a sample,
//! `x_t = α_t·x₀ + σ_t·ε` (docs/method.md §3.1).

use lisa_core::NoiseLevel;
use lisa_core::backend::{Backend, DType, Shape};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// The forward noising process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NoiseConfig {
    /// Discrete VP diffusion (diffusers schedules), `t ~ U{0..T−1}`.
    Diffusion {
        /// β schedule.
        betas: BetaSchedule,
        /// `T`.
        num_train_timesteps: usize,
    },
    /// Rectified flow: a schedule position `p` drawn by `weighting` (uniform by default), the
    /// time `t = p` (or, with `num_train_timesteps = N`, diffusers' grid of `N` times
    /// `1/N … 1`), shifted by `shift` (SD3's `t' = s·t / (1 + (s − 1)·t)`) and embedded as
    /// `1000·t'`, as `FlowMatchEulerDiscreteScheduler`'s timesteps are.
    Flow {
        /// SD3 shift (the scheduler config's `shift`; 3.0 for SD3).
        shift: Option<f64>,
        /// How training draws times and weights the diffusion loss (train_controlnet_sd3.py's
        /// `--weighting_scheme`; none: uniform times, unweighted).
        #[serde(default)]
        weighting: FlowWeighting,
        /// Draw from diffusers' grid of this many training times (1000 in SD3's scheduler)
        /// instead of continuously.
        #[serde(default)]
        num_train_timesteps: Option<usize>,
        /// Precondition the outputs (`--precondition_outputs`, on in train_controlnet_sd3.py):
        /// the loss compares `x_t − σ·pred` with `x₀`, which is the velocity loss times `σ²`.
        #[serde(default)]
        precondition_outputs: bool,
        /// The shift of the sampling schedule when it is not `shift` (Flux's dynamic shift for
        /// the trained image size, `e^μ`): sampling then steps σ from 1 to 1/n before shifting,
        /// as `FluxPipeline` does. Training ignores it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sampling_shift: Option<f64>,
    },
}

impl NoiseConfig {
    /// SD3's training flow as train_controlnet_sd3.py runs it with its defaults: shift 3 over
    /// 1000 training times, logit-normal(0, 1) times, preconditioned outputs.
    pub fn sd3() -> Self {
        NoiseConfig::Flow {
            shift: Some(3.0),
            weighting: FlowWeighting::LogitNormal { mean: 0.0, std: 1.0 },
            num_train_timesteps: Some(1000),
            precondition_outputs: true,
            sampling_shift: None,
        }
    }
}

/// diffusers' `--weighting_scheme` for flow matching: a density for the training times
/// (`compute_density_for_timestep_sampling`) or a weight on the loss
/// (`compute_loss_weighting_for_sd3`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "scheme")]
pub enum FlowWeighting {
    /// Uniform times, unweighted loss.
    #[default]
    None,
    /// `u = sigmoid(mean + std·z)`, `z ~ N(0, 1)` (SD3's default, mean 0, std 1).
    LogitNormal {
        /// `--logit_mean`.
        mean: f64,
        /// `--logit_std`.
        std: f64,
    },
    /// `u = 1 − v − scale·(cos²(πv/2) − 1 + v)`, `v ~ U(0, 1)` (`--mode_scale`, 1.29).
    Mode {
        /// `--mode_scale`.
        scale: f64,
    },
    /// Uniform times, loss weighted by `σ⁻²`.
    SigmaSqrt,
    /// Uniform times, loss weighted by `2 / (π·(1 − 2σ + 2σ²))`.
    Cosmap,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        NoiseConfig::Diffusion { betas: BetaSchedule::DDPM_LINEAR, num_train_timesteps: 1000 }
    }
}

/// The forward process, prepared.
#[derive(Debug)]
pub enum NoiseProcess {
    /// Discrete VP diffusion.
    Diffusion(DiscreteVp<f32>),
    /// Rectified flow.
    Flow {
        /// The time shift.
        flow: RectifiedFlow,
        /// The time density and loss weight.
        weighting: FlowWeighting,
        /// diffusers' grid of training times, if any.
        grid: Option<usize>,
        /// Loss weight `σ²` (preconditioned outputs).
        precondition: bool,
    },
}

impl NoiseProcess {
    /// Prepares `config`.
    pub fn new(config: &NoiseConfig) -> Result<Self> {
        Ok(match *config {
            NoiseConfig::Diffusion { betas, num_train_timesteps } => {
                NoiseProcess::Diffusion(DiscreteVp::new(betas, num_train_timesteps)?)
            }
            NoiseConfig::Flow { shift, weighting, num_train_timesteps, precondition_outputs, sampling_shift } => {
                let bad = |m: String| Err(TrainError::setting("train.noise", m));
                match weighting {
                    FlowWeighting::LogitNormal { mean, std } if !(mean.is_finite() && std.is_finite() && std > 0.0) => {
                        return bad(format!("logit_normal needs a finite mean and std > 0, got {mean} and {std}"));
                    }
                    FlowWeighting::Mode { scale } if !scale.is_finite() => {
                        return bad(format!("mode needs a finite scale, got {scale}"));
                    }
                    FlowWeighting::SigmaSqrt if num_train_timesteps.is_none() => {
                        return bad("sigma_sqrt weights the loss by 1/σ², infinite at σ = 0: it needs num_train_timesteps (diffusers' grid, σ ≥ 1/N)".into());
                    }
                    _ => {}
                }
                if num_train_timesteps == Some(0) {
                    return bad("num_train_timesteps must be >= 1".into());
                }
                let flow = RectifiedFlow { shift };
                flow.shifted_time(0.5f64)?;
                RectifiedFlow { shift: sampling_shift }.shifted_time(0.5f64)?;
                NoiseProcess::Flow { flow, weighting, grid: num_train_timesteps, precondition: precondition_outputs }
            }
        })
    }

    /// A training draw's position in the schedule (what [`Self::draw`] maps to a timestep) from
    /// a uniform `v ∈ [0, 1)`: `v` itself, or for a flow's time density, `1 − u` with `u` its
    /// draw (diffusers indexes its times from the noisiest, so positions rise with `σ` as
    /// everywhere else).
    pub fn position(&self, v: f32) -> f32 {
        let NoiseProcess::Flow { weighting, .. } = self else { return v };
        let v = v as f64;
        let u = match *weighting {
            FlowWeighting::LogitNormal { mean, std } => {
                let z = standard_normal_quantile(v.clamp(1e-12, 1.0 - 1e-12));
                1.0 / (1.0 + (-(mean + std * z)).exp())
            }
            FlowWeighting::Mode { scale } => {
                1.0 - v - scale * ((core::f64::consts::PI * v / 2.0).cos().powi(2) - 1.0 + v)
            }
            _ => return v as f32,
        };
        (1.0 - u).clamp(0.0, 1.0) as f32
    }

    /// `(timestep embedding value, level)` at schedule position `u ∈ [0, 1)`: `t = ⌊u·T⌋`
    /// (diffusion); for a flow, the time `t = u` (or the grid's `(N − ⌊(1 − u)·N⌋) / N`, at
    /// least `1/N`), shifted, embedded as `1000·t'`.
    pub fn draw(&self, u: f32) -> Result<(f32, NoiseLevel<f32>)> {
        match self {
            NoiseProcess::Diffusion(s) => {
                let t = ((u * s.num_train_timesteps() as f32) as usize).min(s.num_train_timesteps() - 1);
                Ok((t as f32, s.level(t)?))
            }
            NoiseProcess::Flow { flow, grid, .. } => {
                let t = match *grid {
                    None => u.clamp(0.0, 1.0),
                    Some(n) => {
                        // diffusers: index ⌊u_d·N⌋ into times N/N … 1/N, u_d = 1 − u.
                        let index = (((1.0 - u as f64) * n as f64) as usize).min(n - 1);
                        ((n - index) as f64 / n as f64) as f32
                    }
                };
                let level = flow.level(t)?;
                Ok((1000.0 * level.sigma, level))
            }
        }
    }

    /// The diffusion loss's per-sample weights at `levels`, None when all are 1: a flow's
    /// `sigma_sqrt` (`σ⁻²`) or `cosmap` (`2 / (π·(1 − 2σ + 2σ²))`) weight, times `σ²` with
    /// preconditioned outputs.
    pub fn loss_weights(&self, levels: &[NoiseLevel<f32>]) -> Option<Vec<f32>> {
        let NoiseProcess::Flow { weighting, precondition, .. } = self else { return None };
        let scheme = |s: f32| match weighting {
            FlowWeighting::SigmaSqrt => 1.0 / (s * s),
            FlowWeighting::Cosmap => 2.0 / (core::f32::consts::PI * (1.0 - 2.0 * s + 2.0 * s * s)),
            _ => 1.0,
        };
        let weighted = *precondition || matches!(weighting, FlowWeighting::SigmaSqrt | FlowWeighting::Cosmap);
        weighted.then(|| {
            levels.iter().map(|l| scheme(l.sigma) * if *precondition { l.sigma * l.sigma } else { 1.0 }).collect()
        })
    }
}

/// `Φ⁻¹(p)`, the standard normal quantile, for `p ∈ (0, 1)`: Acklam's rational approximation
/// (relative error below 1.2·10⁻⁹, far under f32's resolution of the draws it maps). Written
/// here because no maintained crate the trainer depends on has it.
fn standard_normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// `a_b·x + b_b·y` over a batch `[n, …]` with per-sample scalars `(a_b, b_b)`: the noised
/// sample (`α, σ` over `x₀, ε`) and every prediction target (ε, v, x₀, u) of a batch.
pub fn add_noise<B: Backend>(
    x0: &B::Tensor,
    eps: &B::Tensor,
    coefficients: impl Fn(&NoiseLevel<f32>) -> (f32, f32),
    levels: &[NoiseLevel<f32>],
) -> Result<B::Tensor> {
    let device = B::device(x0);
    let per_sample = |pick: &dyn Fn((f32, f32)) -> f32| {
        let values: Vec<f32> = levels.iter().map(|l| pick(coefficients(l))).collect();
        B::from_slice(&values, &Shape::new([levels.len(), 1, 1, 1]), DType::F32, &device)
    };
    let a = per_sample(&|c| c.0)?;
    let b = per_sample(&|c| c.1)?;
    Ok(B::add(&B::mul(x0, &a)?, &B::mul(eps, &b)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_quantile_matches_known_values() {
        for (p, z) in [(0.5, 0.0), (0.975, 1.959963984540054), (0.001, -3.090232306167813), (0.2, -0.8416212335729143)]
        {
            assert!((standard_normal_quantile(p) - z).abs() < 1e-8, "Φ⁻¹({p})");
            assert!((standard_normal_quantile(1.0 - p) + z).abs() < 1e-8, "Φ⁻¹(1 − {p})");
        }
    }

    #[test]
    fn sd3_draws_follow_diffusers_grid_and_shift() {
        let p = NoiseProcess::new(&NoiseConfig::sd3()).unwrap();
        // Position 0.5 = u_d 0.5: index 500, time 0.5, shifted 3·0.5 / (1 + 2·0.5) = 0.75.
        let (t, level) = p.draw(0.5).unwrap();
        assert!((level.sigma - 0.75).abs() < 1e-6 && (t - 750.0).abs() < 1e-3, "{t} {level:?}");
        // Position 0 = u_d 1: the last index, time 1/1000; the highest position is time 1.
        let (_, low) = p.draw(0.0).unwrap();
        let s = 3.0 * 0.001 / (1.0 + 2.0 * 0.001);
        assert!((low.sigma - s).abs() < 1e-6);
        assert!((p.draw(0.9999).unwrap().1.sigma - 1.0).abs() < 1e-6);
        // The logit-normal density is symmetric about 0.5 and mostly in the middle.
        assert!((p.position(0.5) - 0.5).abs() < 1e-6);
        let mid = (0..1000).map(|i| p.position((i as f32 + 0.5) / 1000.0)).filter(|u| (0.27..0.73).contains(u));
        assert!((mid.count() as f64 - 682.7).abs() < 3.0, "±1 std of the logit");
        // Preconditioned outputs weight the velocity loss by σ².
        assert_eq!(p.loss_weights(&[level]).unwrap(), vec![0.75 * 0.75]);
    }

    #[test]
    fn flow_settings_are_checked() {
        let flow = |weighting, grid| NoiseConfig::Flow {
            shift: None,
            weighting,
            num_train_timesteps: grid,
            precondition_outputs: false,
            sampling_shift: None,
        };
        assert!(NoiseProcess::new(&flow(FlowWeighting::SigmaSqrt, None)).is_err());
        assert!(NoiseProcess::new(&flow(FlowWeighting::LogitNormal { mean: 0.0, std: 0.0 }, None)).is_err());
        assert!(NoiseProcess::new(&flow(FlowWeighting::None, Some(0))).is_err());
        let plain = NoiseProcess::new(&flow(FlowWeighting::None, None)).unwrap();
        assert_eq!(plain.position(0.3), 0.3);
        assert!(plain.loss_weights(&[plain.draw(0.3).unwrap().1]).is_none());
        let cosmap = NoiseProcess::new(&flow(FlowWeighting::Cosmap, None)).unwrap();
        let w = cosmap.loss_weights(&[cosmap.draw(0.5).unwrap().1]).unwrap()[0];
        assert!((w - 2.0 / (core::f32::consts::PI * 0.5)).abs() < 1e-6);
        // Mode: u_d falls as the draw rises (the density is monotone), so the position rises;
        // both stay in [0, 1].
        let mode = NoiseProcess::new(&flow(FlowWeighting::Mode { scale: 1.29 }, Some(1000))).unwrap();
        let (a, b) = (mode.position(0.1), mode.position(0.9));
        assert!((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&b) && a < b, "{a} {b}");
    }
}
