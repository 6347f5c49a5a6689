use alloc::format;

use super::NoiseLevel;
use crate::real::Real;
use crate::{Error, Result};

/// Rectified flow: `x_t = (1 − t)·x₀ + t·ε`, velocity `u = ε − x₀`.
///
/// With `shift = Some(s)` the time is first warped as in SD3:
/// `t' = s·t / (1 + (s − 1)·t)` (s > 1 spends more steps at high noise).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RectifiedFlow {
    /// SD3 time shift `s` (> 0), or none.
    pub shift: Option<f64>,
}

impl RectifiedFlow {
    /// The time actually used: `t` itself, or the SD3-shifted `s·t / (1 + (s − 1)·t)`.
    pub fn shifted_time<F: Real>(&self, t: F) -> Result<F> {
        const OP: &str = "RectifiedFlow";
        if !(t >= F::zero() && t <= F::one()) {
            return Err(Error::invalid(OP, format!("t must lie in [0, 1], got {t}")));
        }
        match self.shift {
            None => Ok(t),
            Some(s) if s > 0.0 && s.is_finite() => {
                let s = F::lit(s);
                Ok(s * t / (F::one() + (s - F::one()) * t))
            }
            Some(s) => Err(Error::invalid(OP, format!("shift must be > 0, got {s}"))),
        }
    }

    /// The [`NoiseLevel`] `(1 − t', t')` at `t ∈ [0, 1]`.
    pub fn level<F: Real>(&self, t: F) -> Result<NoiseLevel<F>> {
        let t = self.shifted_time(t)?;
        NoiseLevel::new(F::one() - t, t)
    }
}
