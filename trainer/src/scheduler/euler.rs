//! Euler steps of the rectified-flow ODE `dx/dt = u(x, t)` from `t = 1` (noise) to 0.

use lisa_core::backend::Backend;
use lisa_core::schedule::RectifiedFlow;

use super::{Scheduler, SchedulerConfig};
use crate::error::{Result, TrainError};

/// Euler on a rectified flow, uniform in `t` and then shifted (SD3's shift).
pub struct EulerFlow {
    /// Shifted times `t_0 = 1 > … > t_n = 0`.
    times: Vec<f32>,
    /// The model's timestep input at each step (`1000·t` of the shifted time, as
    /// `FlowMatchEulerDiscreteScheduler`'s timesteps).
    values: Vec<f32>,
}

impl EulerFlow {
    /// `config.steps` uniform steps.
    pub fn new(shift: Option<f64>, config: &SchedulerConfig) -> Result<Self> {
        if config.spacing.is_some() {
            return Err(TrainError::Config(
                "timestep spacing applies to discrete diffusion schedules; the flow sampler steps uniformly in t"
                    .into(),
            ));
        }
        let flow = RectifiedFlow { shift };
        let n = config.steps;
        let uniform: Vec<f32> = (0..=n).map(|i| 1.0 - i as f32 / n as f32).collect();
        let times: Vec<f32> = uniform.iter().map(|&t| flow.shifted_time(t)).collect::<lisa_core::Result<_>>()?;
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
