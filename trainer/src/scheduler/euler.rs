//! Euler steps of the rectified-flow ODE `dx/dt = u(x, t)` from `t = 1` (noise) to 0.

use lisa_core::backend::Backend;
use lisa_core::schedule::RectifiedFlow;

use super::{Scheduler, SchedulerConfig};
use crate::error::{Result, TrainError};

/// Euler on a rectified flow, uniform in `t` and then shifted (SD3's shift). A flow trained on
/// diffusers' grid of `N` times steps as `FlowMatchEulerDiscreteScheduler.set_timesteps` does:
/// `n` times uniform from `σ_max = 1` to `σ_min = shift(1/N)` (the grid's last, already shifted),
/// shifted again, then 0.
pub struct EulerFlow {
    /// Shifted times `t_0 = 1 > … > t_n = 0`.
    times: Vec<f32>,
    /// The model's timestep input at each step (`1000·t` of the shifted time, as
    /// `FlowMatchEulerDiscreteScheduler`'s timesteps).
    values: Vec<f32>,
}

impl EulerFlow {
    /// `config.steps` steps; `grid`: the `num_train_timesteps` of diffusers' grid, if the
    /// flow was trained on one.
    pub fn new(shift: Option<f64>, grid: Option<usize>, config: &SchedulerConfig) -> Result<Self> {
        if config.spacing.is_some() {
            return Err(TrainError::Config(
                "timestep spacing applies to discrete diffusion schedules; the flow sampler steps uniformly in t"
                    .into(),
            ));
        }
        let flow = RectifiedFlow { shift };
        let n = config.steps;
        let times: Vec<f32> = match grid {
            None => {
                let uniform: Vec<f32> = (0..=n).map(|i| 1.0 - i as f32 / n as f32).collect();
                uniform.iter().map(|&t| flow.shifted_time(t)).collect::<lisa_core::Result<_>>()?
            }
            Some(grid) => {
                // numpy's linspace in f64 from σ_max to σ_min (f32 values), shifted in f64.
                let sigma_min = flow.shifted_time(1.0 / grid as f32)? as f64;
                let step = if n > 1 { (sigma_min - 1.0) / (n - 1) as f64 } else { 0.0 };
                let mut times: Vec<f32> = (0..n)
                    .map(|i| flow.shifted_time(if i + 1 == n && n > 1 { sigma_min } else { 1.0 + step * i as f64 }))
                    .map(|t| t.map(|t| t as f32))
                    .collect::<lisa_core::Result<_>>()?;
                times.push(0.0);
                times
            }
        };
        Ok(Self { values: times[..n].iter().map(|&t| 1000.0 * t).collect(), times })
    }

    /// `FluxPipeline`'s schedule: σ = linspace(1, 1/n, n) in f64, shifted by `shift` (`e^μ`
    /// of the dynamic shift: `σ' = s·σ / (1 + (s − 1)·σ)`), then 0.
    pub fn flux(shift: f64, config: &SchedulerConfig) -> Result<Self> {
        if config.spacing.is_some() {
            return Err(TrainError::Config(
                "timestep spacing applies to discrete diffusion schedules; the flow sampler steps uniformly in t"
                    .into(),
            ));
        }
        let flow = RectifiedFlow { shift: Some(shift) };
        let n = config.steps;
        let last = 1.0 / n as f64;
        let step = if n > 1 { (last - 1.0) / (n - 1) as f64 } else { 0.0 };
        let mut times: Vec<f32> = (0..n)
            .map(|i| flow.shifted_time(1.0 + step * i as f64).map(|t| t as f32))
            .collect::<lisa_core::Result<_>>()?;
        times.push(0.0);
        Ok(Self { values: times[..n].iter().map(|&t| 1000.0 * t).collect(), times })
    }
}

impl<B: Backend> Scheduler<B> for EulerFlow {
    fn timesteps(&self) -> &[f32] {
        &self.values
    }

    /// `x ← x + (t_{k+1} − t_k)·u`.
    fn step(&self, k: usize, pred: &B::Tensor, x: &B::Tensor) -> Result<B::Tensor> {
        let (Some(t), Some(next)) = (self.times.get(k), self.times.get(k + 1)) else {
            return Err(TrainError::Mismatch(format!("step {k} of a {}-step schedule", self.values.len())));
        };
        Ok(B::axpby(1.0, x, next - t, pred)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers 0.42.1: `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s)
    /// .set_timesteps(n)`'s `sigmas` (then 0) for (s, n) = (3, 4) and (1, 3).
    #[test]
    fn sd3_sampling_times_are_diffusers() {
        let cases: [(f64, usize, &[f32]); 2] =
            [(3.0, 4, &[1.0, 0.857_692_3, 0.602_150_56, 0.008_928_572, 0.0]), (1.0, 3, &[1.0, 0.500_5, 0.001, 0.0])];
        for (shift, steps, want) in cases {
            let config = SchedulerConfig {
                sampler: super::super::Sampler::Euler,
                steps,
                spacing: None,
                prediction: lisa_core::Prediction::FlowVelocity,
                clip_sample: false,
                seed: 0,
            };
            let e = EulerFlow::new(Some(shift), Some(1000), &config).unwrap();
            assert_eq!(e.times.len(), want.len());
            for (got, want) in e.times.iter().zip(want) {
                assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "shift {shift}: {:?} vs {want:?}", e.times);
            }
            for (v, t) in e.values.iter().zip(&e.times) {
                assert!((v - 1000.0 * t).abs() < 1e-3);
            }
        }
    }

    /// diffusers 0.42.1: FLUX.1-dev's scheduler (`use_dynamic_shifting`, base/max shift 0.5 /
    /// 1.15 over 256 … 4096 tokens) `.set_timesteps(sigmas=linspace(1, 1/n, n), mu=μ)`'s
    /// `sigmas` for (n, tokens) = (4, 16): μ = 0.459375, and (3, 4096): μ = 1.15.
    #[test]
    fn flux_sampling_times_are_diffusers() {
        let cases: [(f64, usize, &[f32]); 2] = [
            (0.459375, 4, &[1.0, 0.826_064_35, 0.612_865_9, 0.345_419, 0.0]),
            (1.15, 3, &[1.0, 0.863_320_5, 0.612_267_3, 0.0]),
        ];
        for (mu, steps, want) in cases {
            let config = SchedulerConfig {
                sampler: super::super::Sampler::Euler,
                steps,
                spacing: None,
                prediction: lisa_core::Prediction::FlowVelocity,
                clip_sample: false,
                seed: 0,
            };
            let e = EulerFlow::flux(f64::exp(mu), &config).unwrap();
            assert_eq!(e.times.len(), want.len());
            for (got, want) in e.times.iter().zip(want) {
                assert!((got - want).abs() <= 1e-6, "μ {mu}: {:?} vs {want:?}", e.times);
            }
        }
    }
}
