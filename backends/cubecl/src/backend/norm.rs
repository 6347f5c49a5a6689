//! Group norm forward and backward.

use cubecl::prelude::*;
use lisa_core::Result;
use lisa_core::backend::geometry::GroupNormGeometry;
use lisa_core::backend::{ArithOps, DType, GroupNormGrads, GroupNormOutput, GroupNormParams, NormOps, TensorOps};

use super::{CubeBackend, T, alloc, arg, check_dtype, u32_of};
use crate::kernels::{BLOCK, norm as k};
use crate::launch::{grid_1d, with_float};

impl<R: Runtime> NormOps for CubeBackend<R> {
    fn group_norm(x: &T<R>, gamma: &T<R>, beta: &T<R>, params: GroupNormParams) -> Result<GroupNormOutput<T<R>>> {
        const OP: &str = "group_norm";
        let dtype = Self::expect_same_dtype(OP, x, gamma)?;
        Self::expect_same_dtype(OP, x, beta)?;
        let g = GroupNormGeometry::new(OP, &x.shape, &gamma.shape, &beta.shape, params)?;
        check_dtype(OP, &x.device, dtype)?;
        let device = &x.device;
        let output = alloc(device, x.shape.clone(), dtype)?;
        let mean = alloc(device, g.stats_shape(), DType::F32)?;
        let rstd = alloc(device, g.stats_shape(), DType::F32)?;
        let groups = g.batch * g.groups;
        if groups == 0 || g.group_len() == 0 {
            return Ok(GroupNormOutput {
                output,
                mean: Self::full(&g.stats_shape(), 0.0, DType::F32, device)?,
                rstd: Self::full(&g.stats_shape(), 0.0, DType::F32, device)?,
            });
        }
        with_float!(dtype, F => {
            k::group_stats::launch::<F, R>(
                &device.client, CubeCount::Static(u32_of(OP, groups)?, 1, 1), CubeDim::new_1d(BLOCK),
                arg(x), arg(&mean), arg(&rstd), u32_of(OP, g.group_len())?, params.eps, BLOCK
            );
        });
        apply_affine(OP, &g, (x, gamma, beta), (&mean, &rstd), &output)?;
        Ok(GroupNormOutput { output, mean, rstd })
    }

    /// The pre-activation recomputed from the forward's statistics (one affine kernel, no new
    /// statistics), then SiLU's and the norm's backwards.
    fn group_norm_silu_backward(
        x: &T<R>,
        gamma: &T<R>,
        beta: &T<R>,
        stats: &GroupNormOutput<T<R>>,
        grad_out: &T<R>,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<T<R>>> {
        const OP: &str = "group_norm_silu_backward";
        let dtype = Self::expect_same_dtype(OP, x, gamma)?;
        Self::expect_same_dtype(OP, x, beta)?;
        x.shape.expect_eq(OP, &grad_out.shape)?;
        let g = GroupNormGeometry::new(OP, &x.shape, &gamma.shape, &beta.shape, params)?;
        g.stats_shape().expect_eq(OP, &stats.mean.shape)?;
        g.stats_shape().expect_eq(OP, &stats.rstd.shape)?;
        check_dtype(OP, &x.device, dtype)?;
        let z = alloc(&x.device, x.shape.clone(), dtype)?;
        if !z.is_empty() && g.group_len() > 0 {
            let (mean, rstd) = (Self::cast(&stats.mean, DType::F32)?, Self::cast(&stats.rstd, DType::F32)?);
            apply_affine(OP, &g, (x, gamma, beta), (&mean, &rstd), &z)?;
        }
        let dz = Self::silu_backward(&z, grad_out)?;
        Self::group_norm_backward(x, gamma, stats, &dz, params)
    }
    fn group_norm_backward(
        x: &T<R>,
        gamma: &T<R>,
        stats: &GroupNormOutput<T<R>>,
        grad_out: &T<R>,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<T<R>>> {
        const OP: &str = "group_norm_backward";
        let dtype = Self::expect_same_dtype(OP, x, gamma)?;
        Self::expect_same_dtype(OP, x, grad_out)?;
        x.shape.expect_eq(OP, &grad_out.shape)?;
        let g = GroupNormGeometry::new(OP, &x.shape, &gamma.shape, &gamma.shape, params)?;
        g.stats_shape().expect_eq(OP, &stats.mean.shape)?;
        g.stats_shape().expect_eq(OP, &stats.rstd.shape)?;
        check_dtype(OP, &x.device, dtype)?;
        // The statistics are f32 whatever the input's dtype.
        let mean = Self::cast(&stats.mean, DType::F32)?;
        let rstd = Self::cast(&stats.rstd, DType::F32)?;
        let device = &x.device;
        let input = alloc(device, x.shape.clone(), dtype)?;
        let dgamma = alloc(device, gamma.shape.clone(), dtype)?;
        let dbeta = alloc(device, gamma.shape.clone(), dtype)?;
        let groups = g.batch * g.groups;
        if groups == 0 || g.group_len() == 0 {
            let zeros = Self::full(&gamma.shape, 0.0, dtype, device)?;
            return Ok(GroupNormGrads { input, gamma: zeros.clone(), beta: zeros });
        }
        let cpg = g.channels / g.groups;
        let sums = device.client.empty(groups * 2 * 4);
        // SAFETY: `sums` holds 2 f32 per group.
        let sums_arg = || unsafe { ArrayArg::<R>::from_raw_parts(sums.clone(), groups * 2) };
        let u = |v: usize| u32_of(OP, v);
        with_float!(dtype, F => {
            k::group_grad_sums::launch::<F, R>(
                &device.client, CubeCount::Static(u(groups)?, 1, 1), CubeDim::new_1d(BLOCK),
                arg(x), arg(gamma), arg(grad_out), arg(&mean), arg(&rstd), sums_arg(),
                u(g.group_len())?, u(g.spatial)?, u(cpg)?, BLOCK
            );
            let (count, dim) = grid_1d(input.len());
            k::group_norm_dx::launch::<F, R>(
                &device.client, count, dim, arg(x), arg(gamma), arg(grad_out), arg(&mean), arg(&rstd), sums_arg(),
                arg(&input), u(g.channels)?, u(g.spatial)?, u(cpg)?
            );
            k::group_norm_dparams::launch::<F, R>(
                &device.client, CubeCount::Static(u(g.channels)?, 1, 1), CubeDim::new_1d(BLOCK),
                arg(x), arg(grad_out), arg(&mean), arg(&rstd), arg(&dgamma), arg(&dbeta),
                u(g.batch)?, u(g.spatial)?, u(cpg)?, BLOCK
            );
        });
        Ok(GroupNormGrads { input, gamma: dgamma, beta: dbeta })
    }
}

/// `out = (x − μ)·rstd·γ + β` from f32 statistics `[n, groups]` (one kernel).
fn apply_affine<R: Runtime>(
    op: &'static str,
    g: &GroupNormGeometry,
    (x, gamma, beta): (&T<R>, &T<R>, &T<R>),
    (mean, rstd): (&T<R>, &T<R>),
    out: &T<R>,
) -> Result<()> {
    let (count, dim) = grid_1d(out.len());
    with_float!(out.dtype, F => k::group_norm_apply::launch::<F, R>(
        &x.device.client, count, dim, arg(x), arg(gamma), arg(beta), arg(mean), arg(rstd), arg(out),
        u32_of(op, g.channels)?, u32_of(op, g.spatial)?, u32_of(op, g.channels / g.groups)?
    ));
    Ok(())
}
