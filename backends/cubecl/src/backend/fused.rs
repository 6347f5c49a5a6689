//! The fused training ops: MSE, LISA and AdamW.

use cubecl::prelude::*;
use lisa_core::backend::{AdamWParams, ArithOps, FusedOps, LayoutOps, ReduceOps, Shape, TensorOps};
use lisa_core::lisa::{LisaConfig, LisaLoss, SampleSums, SampleTerms, sample_coefficients};
use lisa_core::{Error, Result};

use super::{CubeBackend, T, alloc, arg, check_dtype, f32_buffer, read_f32, u32_of};
use crate::kernels::{BLOCK, fused as k};
use crate::launch::{grid_1d, vector_width, with_float};

impl<R: Runtime> FusedOps for CubeBackend<R> {
    /// The per-tensor sums of squares stay on the device, joined into one vector, read back
    /// once and added in `f64` in order (the default's arithmetic, one synchronisation).
    fn sum_squares_all(tensors: &[&T<R>]) -> Result<f64> {
        if tensors.is_empty() {
            return Ok(0.0);
        }
        let one = Shape::new([1]);
        let partials =
            tensors.iter().map(|t| Self::reshape(&Self::sum_squares(t)?, &one)).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&T<R>> = partials.iter().collect();
        let joined = Self::concat(&refs, 0)?;
        Ok(Self::to_vec(&joined)?.iter().map(|&v| v as f64).sum())
    }

    /// `L = mean((p − y)²)`, `∂L/∂p = 2(p − y)/N`: one axpby kernel for the gradient, one
    /// two-stage tree sum of its squares.
    fn mse_loss(pred: &T<R>, target: &T<R>) -> Result<(f32, T<R>)> {
        const OP: &str = "mse_loss";
        let dtype = Self::expect_same_dtype(OP, pred, target)?;
        pred.shape.expect_eq(OP, &target.shape)?;
        check_dtype(OP, &pred.device, dtype)?;
        if pred.is_empty() {
            return Err(Error::Empty { op: OP });
        }
        let n = pred.len() as f32;
        let diff = Self::axpby(1.0, pred, -1.0, target)?;
        let loss = Self::item(&Self::sum_squares(&diff)?)? / n;
        if !loss.is_finite() {
            return Err(Error::NonFinite { op: OP });
        }
        Ok((loss, Self::affine(&diff, 2.0 / n, 0.0)?))
    }

    /// One cube per sample sums `(d − τ)², d·τ, d², τ²` (`τ = scale_b·(y − prior)`, never
    /// stored); the host turns those `4B` numbers into the loss and per-sample coefficients
    /// `α_b, β_b`; a second kernel writes `∂L/∂d = α_b·d + β_b·τ`.
    fn lisa_loss(
        config: &LisaConfig,
        terms: &[SampleTerms<f32>],
        decoded: &T<R>,
        y: &T<R>,
        prior: &T<R>,
    ) -> Result<(LisaLoss<f32>, T<R>)> {
        const OP: &str = "lisa_loss";
        let dtype = Self::expect_same_dtype(OP, decoded, y)?;
        Self::expect_same_dtype(OP, decoded, prior)?;
        decoded.shape.expect_eq(OP, &y.shape)?;
        decoded.shape.expect_eq(OP, &prior.shape)?;
        config.validate()?;
        check_dtype(OP, &decoded.device, dtype)?;
        let (len, batch) = (decoded.len(), terms.len());
        if batch == 0 || len == 0 {
            return Err(Error::Empty { op: OP });
        }
        if !len.is_multiple_of(batch) {
            return Err(Error::invalid(OP, format!("{len} elements cannot be split into {batch} equal samples")));
        }
        let per = len / batch;
        let device = &decoded.device;
        let scales: Vec<f32> = terms.iter().map(|t| t.target_scale).collect();
        let (scale, _) = f32_buffer(device, &scales);
        // SAFETY: `scale` holds `batch` f32 values.
        let scale_arg = || unsafe { ArrayArg::<R>::from_raw_parts(scale.clone(), batch) };
        let sums = device.client.empty(batch * 4 * 4);
        // SAFETY: `sums` holds 4 f32 per sample.
        let sums_arg = unsafe { ArrayArg::<R>::from_raw_parts(sums.clone(), batch * 4) };
        with_float!(dtype, F => k::lisa_sums::launch::<F, R>(
            &device.client, CubeCount::Static(u32_of(OP, batch)?, 1, 1), CubeDim::new_1d(BLOCK),
            arg(decoded), arg(y), arg(prior), scale_arg(), sums_arg, u32_of(OP, per)?, BLOCK
        ));
        let s = read_f32(device, sums, batch * 4)?;
        let (distance, zero_distance, coef) = lisa_coefficients(config, terms, &s, len);
        let weighted = config.lambda * distance;
        if !weighted.is_finite() || !distance.is_finite() {
            return Err(Error::NonFinite { op: OP });
        }
        let (coef, _) = f32_buffer(device, &coef);
        // SAFETY: `coef` holds 2 f32 per sample.
        let coef_arg = unsafe { ArrayArg::<R>::from_raw_parts(coef, batch * 2) };
        let grad = alloc(device, decoded.shape.clone(), dtype)?;
        let (count, dim) = grid_1d(len);
        with_float!(dtype, F => k::lisa_grad::launch::<F, R>(
            &device.client, count, dim, arg(decoded), arg(y), arg(prior), scale_arg(), coef_arg, arg(&grad),
            u32_of(OP, per)?
        ));
        let loss =
            LisaLoss { weighted: weighted as f32, distance: distance as f32, zero_distance: zero_distance as f32 };
        Ok((loss, grad))
    }

    /// Out of place (new buffers for `param`, `m`, `v`), so clones of the old tensors keep
    /// their values; all four tensors share one dtype.
    fn adamw_update(param: &mut T<R>, m: &mut T<R>, v: &mut T<R>, grad: &T<R>, hp: &AdamWParams) -> Result<()> {
        const OP: &str = "adamw_update";
        for t in [&*m, &*v, grad] {
            param.shape.expect_eq(OP, &t.shape)?;
            Self::expect_same_dtype(OP, param, t)?;
        }
        hp.validate()?;
        check_dtype(OP, &param.device, param.dtype)?;
        if param.is_empty() {
            return Ok(());
        }
        let device = param.device.clone();
        let (p2, m2, v2) = (
            alloc(&device, param.shape.clone(), param.dtype)?,
            alloc(&device, param.shape.clone(), param.dtype)?,
            alloc(&device, param.shape.clone(), param.dtype)?,
        );
        let (c1, c2) = hp.bias_corrections();
        let w = vector_width(param.len());
        let (count, dim) = grid_1d(param.len() / w);
        with_float!(param.dtype, F => k::adamw::launch::<F, R>(
            &device.client, count, dim, w, arg(param), arg(m), arg(v), arg(grad), arg(&p2), arg(&m2), arg(&v2),
            hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, c1, c2
        ));
        *param = p2;
        *m = m2;
        *v = v2;
        Ok(())
    }
}

/// The LISA distance `Σ_b w_b·D_b` and the gradient coefficients `(α_b, β_b)` per sample
/// from the per-sample sums `(Σ(d−τ)², ⟨d,τ⟩, ‖d‖², ‖τ‖²)` read back from the device, in
/// f64 ([`sample_coefficients`] holds the formulas), `n` = all elements.
fn lisa_coefficients(config: &LisaConfig, terms: &[SampleTerms<f32>], sums: &[f32], n: usize) -> (f64, f64, Vec<f32>) {
    let (mut distance, mut zero_distance) = (0.0f64, 0.0f64);
    let mut coef = Vec::with_capacity(terms.len() * 2);
    for (t, s) in terms.iter().zip(sums.chunks_exact(4)) {
        let sums = SampleSums::unscaled(s[0] as f64, s[1] as f64, s[2] as f64, s[3] as f64);
        let c = sample_coefficients(config, t.weight as f64, &sums, n, terms.len());
        distance += c.distance;
        zero_distance += sample_coefficients(config, t.weight as f64, &sums.of_zero_decoder(), n, terms.len()).distance;
        coef.extend([c.alpha as f32, c.beta as f32]);
    }
    (distance, zero_distance, coef)
}
