use alloc::format;

use super::{ReduceOps, Shape};
use crate::lisa::{LisaConfig, LisaLoss, SampleTerms, lisa_loss_fused};
use crate::reference::adamw_update_slices;
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
    /// Checks domains: lr, wd ≥ 0; β ∈ [0, 1); ε > 0; step ≥ 1.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "AdamWParams";
        let fail = |what: &str| Err(Error::invalid(OP, format!("{what} (got {self:?})")));
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return fail("lr must be finite and >= 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return fail("weight_decay must be finite and >= 0");
        }
        if !((0.0..1.0).contains(&self.beta1) && (0.0..1.0).contains(&self.beta2)) {
            return fail("betas must lie in [0, 1)");
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return fail("eps must be > 0");
        }
        if self.step == 0 {
            return fail("step is 1-based");
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

/// Fused training ops: the losses and the optimizer update, each one kernel on a GPU.
///
/// The defaults are correct everywhere and are what the reference uses: [`FusedOps::mse_loss`]
/// composes device ops; the LISA and AdamW defaults read the data back to the host and call
/// the slice implementations of this crate. Device backends override them with kernels.
pub trait FusedOps: ReduceOps {
    /// *Default*: `L = mean((p − y)²)` and `∂L/∂p = 2(p − y)/N`.
    fn mse_loss(pred: &Self::Tensor, target: &Self::Tensor) -> Result<(f32, Self::Tensor)> {
        Self::shape(pred).expect_eq("mse_loss", &Self::shape(target))?;
        let diff = Self::sub(pred, target)?;
        let loss = Self::item(&Self::mean(&Self::unary(super::UnaryOp::Square, &diff)?)?)?;
        if !loss.is_finite() {
            return Err(Error::NonFinite { op: "mse_loss" });
        }
        let n = Self::shape(pred).num_elements()?;
        Ok((loss, Self::scale(&diff, 2.0 / n as f32)?))
    }

    /// *Default*: the fused LISA target + loss + backward ([`crate::lisa::lisa_loss_fused`]):
    /// `τ = scale_b·(y − prior)`, returns the term and `∂L/∂decoded`.
    /// `decoded`, `y`, `prior`: `[B, …]` equal shapes, `B = terms.len()`.
    fn lisa_loss(
        config: &LisaConfig,
        terms: &[SampleTerms<f32>],
        decoded: &Self::Tensor,
        y: &Self::Tensor,
        prior: &Self::Tensor,
    ) -> Result<(LisaLoss<f32>, Self::Tensor)> {
        let shape = Self::shape(decoded);
        shape.expect_eq("lisa_loss", &Self::shape(y))?;
        shape.expect_eq("lisa_loss", &Self::shape(prior))?;
        let dtype = Self::expect_same_dtype("lisa_loss", decoded, y)?;
        Self::expect_same_dtype("lisa_loss", decoded, prior)?;
        let (d, yv, p) = (Self::to_vec(decoded)?, Self::to_vec(y)?, Self::to_vec(prior)?);
        let mut grad = alloc::vec![0.0f32; d.len()];
        let loss = lisa_loss_fused(config, terms, &d, &yv, &p, &mut grad)?;
        Ok((loss, Self::from_slice(&grad, &shape, dtype, &Self::device(decoded))?))
    }

    /// *Default*: one AdamW step in place on `param`, `m`, `v` (equal shapes), see
    /// [`AdamWParams`].
    fn adamw_update(
        param: &mut Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        grad: &Self::Tensor,
        hp: &AdamWParams,
    ) -> Result<()> {
        let shape: Shape = Self::shape(param);
        for t in [&*m, &*v, grad] {
            shape.expect_eq("adamw_update", &Self::shape(t))?;
        }
        let device = Self::device(param);
        let (mut p, mut mm, mut vv) = (Self::to_vec(param)?, Self::to_vec(m)?, Self::to_vec(v)?);
        adamw_update_slices(&mut p, &mut mm, &mut vv, &Self::to_vec(grad)?, hp)?;
        *param = Self::from_slice(&p, &shape, Self::dtype(param), &device)?;
        *m = Self::from_slice(&mm, &shape, Self::dtype(m), &device)?;
        *v = Self::from_slice(&vv, &shape, Self::dtype(v), &device)?;
        Ok(())
    }
}
