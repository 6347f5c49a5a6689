//! AdamW: its hyper-parameters and the one update formula every backend applies
//! (the reference and the CPU call [`AdamWStep::apply`]; the cubecl kernel is the same
//! formula in cube code, fed with [`AdamWParams::bias_corrections`]).

use alloc::format;

use crate::slices::check_len;
use crate::{Error, Result};

/// Hyper-parameters of one decoupled-weight-decay Adam step (Loshchilov & Hutter; torch's
/// `AdamW`), at 1-based step `step`:
/// `p ← p·(1 − lr·wd)`; `m ← β₁m + (1−β₁)g`; `v ← β₂v + (1−β₂)g²`;
/// `p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamWParams {
    /// Learning rate.
    pub lr: f32,
    /// β₁ (0.9).
    pub beta1: f32,
    /// β₂ (0.999).
    pub beta2: f32,
    /// ε (1e-8).
    pub eps: f32,
    /// Decoupled weight decay (1e-2).
    pub weight_decay: f32,
    /// 1-based step count `t` (for the bias corrections).
    pub step: u64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, step: 1 }
    }
}

impl AdamWParams {
    /// Checks domains: lr, wd ≥ 0; β ∈ [0, 1); ε > 0; step ≥ 1. An error's `op` names the
    /// offending field (`lr`, `weight_decay`, `beta1`, `beta2`, `eps`, `step`).
    pub fn validate(&self) -> Result<()> {
        let fail = |field: &'static str, what: alloc::string::String| Err(Error::invalid(field, what));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return fail("lr", format!("the learning rate must be finite and >= 0, got {}", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return fail("weight_decay", format!("must be finite and >= 0, got {}", self.weight_decay));
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return fail("beta1", format!("must lie in [0, 1), got {}", self.beta1));
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return fail("beta2", format!("must lie in [0, 1), got {}", self.beta2));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return fail("eps", format!("must be > 0, got {}", self.eps));
        }
        if self.step == 0 {
            return fail("step", "the step count is 1-based, got 0".into());
        }
        Ok(())
    }

    /// The bias corrections `(1 − β₁ᵗ, 1 − β₂ᵗ)`, computed in f64.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let t = self.step.min(i32::MAX as u64) as i32;
        let c1 = 1.0 - num_traits::Float::powi(self.beta1 as f64, t);
        let c2 = 1.0 - num_traits::Float::powi(self.beta2 as f64, t);
        (c1 as f32, c2 as f32)
    }
}

/// The per-step constants of [`AdamWParams`], ready for the element update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    beta1: f32,
    beta2: f32,
    lr: f32,
    eps: f32,
    /// `1 − lr·wd`.
    decay: f32,
    /// `1 − β₁ᵗ`.
    c1: f32,
    /// `1 − β₂ᵗ`.
    c2: f32,
}

impl AdamWStep {
    /// Validates `hp` and precomputes the bias corrections and the decay factor.
    pub fn new(hp: &AdamWParams) -> Result<Self> {
        hp.validate()?;
        let (c1, c2) = hp.bias_corrections();
        Ok(Self {
            beta1: hp.beta1,
            beta2: hp.beta2,
            lr: hp.lr,
            eps: hp.eps,
            decay: 1.0 - hp.lr * hp.weight_decay,
            c1,
            c2,
        })
    }

    /// One element: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p·(1 − lr·wd) − lr·(m/c₁)/(√(v/c₂) + ε)`.
    #[inline(always)]
    pub fn apply(&self, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *p = *p * self.decay - self.lr * (*m / self.c1) / (num_traits::Float::sqrt(*v / self.c2) + self.eps);
    }

    /// The update over equal-length slices, in place.
    #[inline]
    pub fn apply_slices(&self, param: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32]) {
        for (((p, m), v), &g) in param.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(grad) {
            self.apply(p, m, v, g);
        }
    }
}

/// One AdamW step in place over slices (see [`AdamWParams`] for the equations).
pub fn adamw_update_slices(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    hp: &AdamWParams,
) -> Result<()> {
    let step = AdamWStep::new(hp)?;
    check_len("adamw_update", param.len(), &[m.len(), v.len(), grad.len()])?;
    step.apply_slices(param, m, v, grad);
    Ok(())
}
