use super::{ReduceOps, Shape};
use crate::lisa::{LisaConfig, LisaLoss, SampleTerms, lisa_loss_fused};
use crate::optim::{AdamWParams, adamw_update_slices};
use crate::{Error, Result};

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

    /// *Default*: `Σ_i Σ t_i²` over all `tensors`: each tensor's sum of squares read back as
    /// `f32` and added in `f64`, in order (the gradient norm of a whole model). A device
    /// backend overrides it to read all the partial sums in one transfer, adding them the same
    /// way, so that the host waits for the device once, not once per tensor.
    fn sum_squares_all(tensors: &[&Self::Tensor]) -> Result<f64> {
        let mut total = 0.0f64;
        for t in tensors {
            total += Self::item(&Self::sum_squares(t)?)? as f64;
        }
        Ok(total)
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
