//! diffusers' `timestep_spacing`: which of the `T` training timesteps a sampler visits.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How `n` sampling timesteps are picked from `0..T` (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    /// `k·⌊T/n⌋` for `k = n−1 … 0` (DDIM's paper, SD 1.x).
    #[default]
    Leading,
    /// `round(T − k·T/n) − 1` for `k = 0 … n−1`: always starts at `T − 1`.
    Trailing,
    /// `round(linspace(0, T−1, n))`, reversed.
    Linspace,
}

impl std::str::FromStr for Spacing {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            _ => Err(TrainError::Config(format!("unknown timestep spacing {s:?}: leading | trailing | linspace"))),
        }
    }
}

impl Spacing {
    /// The `n` timesteps, noisiest first; `1 ≤ n ≤ T`. Rounding is half-to-even, as numpy's.
    pub fn timesteps(self, n: usize, t_train: usize) -> Result<Vec<usize>> {
        if n == 0 || n > t_train {
            return Err(TrainError::Config(format!(
                "{n} sampling steps: must lie in 1..={t_train} (the training timesteps)"
            )));
        }
        let ts: Vec<usize> = match self {
            Spacing::Leading => (0..n).rev().map(|k| k * (t_train / n)).collect(),
            Spacing::Trailing => {
                let ratio = t_train as f64 / n as f64;
                (0..n).map(|k| (t_train as f64 - k as f64 * ratio).round_ties_even() as usize - 1).collect()
            }
            Spacing::Linspace => {
                let step = if n == 1 { 0.0 } else { (t_train - 1) as f64 / (n - 1) as f64 };
                (0..n).rev().map(|k| (k as f64 * step).round_ties_even() as usize).collect()
            }
        };
        Ok(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers() {
        // diffusers DDIMScheduler(num_train_timesteps=1000).set_timesteps(10) with each spacing.
        assert_eq!(Spacing::Leading.timesteps(10, 1000).unwrap(), [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
        assert_eq!(Spacing::Trailing.timesteps(10, 1000).unwrap(), [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
        assert_eq!(Spacing::Linspace.timesteps(10, 1000).unwrap(), [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
        // Half-way values round to even, as np.round: linspace(0, 999, 25) has 166.5 → 166.
        assert!(Spacing::Linspace.timesteps(25, 1000).unwrap().contains(&166));
        assert!(Spacing::Leading.timesteps(0, 1000).is_err());
        assert!(Spacing::Trailing.timesteps(1001, 1000).is_err());
    }
}
