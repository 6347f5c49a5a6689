use super::geometry::GroupNormParams;
use super::{DType, ReduceOps, Shape};
use crate::{Error, Result};

/// What the group-norm forward returns: the output and the statistics its backward needs.
#[derive(Debug, Clone)]
pub struct GroupNormOutput<T> {
    /// `y = (x − μ_g)·rstd_g·γ_c + β_c`, same shape as `x`.
    pub output: T,
    /// `μ` per (sample, group), `[n, groups]`.
    pub mean: T,
    /// `rstd = 1/√(var + ε)` per (sample, group), `[n, groups]` (biased variance).
    pub rstd: T,
}

/// The gradients of a group norm.
#[derive(Debug, Clone)]
pub struct GroupNormGrads<T> {
    /// `∂L/∂x`, same shape as `x`.
    pub input: T,
    /// `∂L/∂γ`, `[c]`.
    pub gamma: T,
    /// `∂L/∂β`, `[c]`.
    pub beta: T,
}

/// Group normalisation (Wu & He 2018) over `[n, c, *spatial]`, and layer normalisation
/// over the last dim (Ba et al. 2016), the latter composed from the former by default.
pub trait NormOps: ReduceOps {
    /// Forward: per (sample, group) mean and biased variance, then the per-channel affine.
    fn group_norm(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        params: GroupNormParams,
    ) -> Result<GroupNormOutput<Self::Tensor>>;

    /// Backward, with `x̂ = (x − μ)·rstd` and `ĝ = g·γ` over each group of `M` elements:
    /// `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`, `dγ = Σ g·x̂`, `dβ = Σ g`.
    fn group_norm_backward(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        stats: &GroupNormOutput<Self::Tensor>,
        grad_out: &Self::Tensor,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<Self::Tensor>>;

    /// *Default*: `a = silu(group_norm(x))` (the pair every ResBlock applies), with the
    /// statistics of the norm: `output` holds `a`, `mean` and `rstd` the group statistics. A
    /// backend may fuse the two into one pass over `x`; the pre-activation is never needed
    /// afterwards, because the backward recomputes it from the statistics.
    fn group_norm_silu(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        params: GroupNormParams,
    ) -> Result<GroupNormOutput<Self::Tensor>> {
        let z = Self::group_norm(x, gamma, beta, params)?;
        Ok(GroupNormOutput { output: Self::silu(&z.output)?, mean: z.mean, rstd: z.rstd })
    }

    /// *Default*: the backward of [`NormOps::group_norm_silu`]: `z = group_norm(x)` recomputed,
    /// `∂L/∂z = g·silu'(z)`, then [`NormOps::group_norm_backward`]. `stats` are the forward's.
    fn group_norm_silu_backward(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        stats: &GroupNormOutput<Self::Tensor>,
        grad_out: &Self::Tensor,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<Self::Tensor>> {
        let z = Self::group_norm(x, gamma, beta, params)?.output;
        let dz = Self::silu_backward(&z, grad_out)?;
        Self::group_norm_backward(x, gamma, stats, &dz, params)
    }

    /// *Default*: layer norm over the last dim of `x [.., C]` (torch's `LayerNorm(C)`):
    /// `y = (x − μ)·rstd·γ + β` with `μ`, `rstd = 1/√(var + ε)` per row (biased variance),
    /// `γ, β [C]`. Composed as a one-group [`NormOps::group_norm`] of the `[rows, 1, C, 1]`
    /// view and a broadcast affine. The saved `mean`, `rstd` are `[rows, 1]`.
    fn layer_norm(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<GroupNormOutput<Self::Tensor>> {
        const OP: &str = "layer_norm";
        let (view, _) = layer_norm_view(OP, &Self::shape(x), &Self::shape(gamma), &Self::shape(beta))?;
        let (ones, zeros) = unit_affine::<Self>(x)?;
        let stats = Self::group_norm(&Self::reshape(x, &view)?, &ones, &zeros, GroupNormParams { groups: 1, eps })?;
        let x_hat = Self::reshape(&stats.output, &Self::shape(x))?;
        let output = Self::add(&Self::mul(&x_hat, gamma)?, beta)?;
        Ok(GroupNormOutput { output, mean: stats.mean, rstd: stats.rstd })
    }

    /// *Default*: backward of [`NormOps::layer_norm`], with `x̂ = (x − μ)·rstd` and `ĝ = g·γ`
    /// per row of `C`: `dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`, `dγ = Σ_rows g·x̂`,
    /// `dβ = Σ_rows g`.
    fn layer_norm_backward(
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        stats: &GroupNormOutput<Self::Tensor>,
        grad_out: &Self::Tensor,
        eps: f32,
    ) -> Result<GroupNormGrads<Self::Tensor>> {
        const OP: &str = "layer_norm_backward";
        let shape = Self::shape(x);
        let (view, c) = layer_norm_view(OP, &shape, &Self::shape(gamma), &Self::shape(gamma))?;
        shape.expect_eq(OP, &Self::shape(grad_out))?;
        let (ones, _) = unit_affine::<Self>(x)?;
        let g_hat = Self::mul(grad_out, gamma)?;
        let view_stats = GroupNormOutput { output: x.clone(), mean: stats.mean.clone(), rstd: stats.rstd.clone() };
        let input = Self::group_norm_backward(
            &Self::reshape(x, &view)?,
            &ones,
            &view_stats,
            &Self::reshape(&g_hat, &view)?,
            GroupNormParams { groups: 1, eps },
        )?
        .input;
        // x̂ from the saved statistics, broadcast over the row: [.., 1].
        let mut row = shape.dims().to_vec();
        *row.last_mut().expect("rank checked") = 1;
        let row = Shape::new(row);
        // The statistics may be kept in f32 for a half-precision input: compute x̂ in the
        // input's dtype.
        let dtype = Self::dtype(x);
        let mean = Self::cast(&Self::reshape(&stats.mean, &row)?, dtype)?;
        let rstd = Self::cast(&Self::reshape(&stats.rstd, &row)?, dtype)?;
        let x_hat = Self::mul(&Self::sub(x, &mean)?, &rstd)?;
        let channels = Shape::new([c]);
        Ok(GroupNormGrads {
            input: Self::reshape(&input, &shape)?,
            gamma: Self::sum_to_shape(&Self::mul(grad_out, &x_hat)?, &channels)?,
            beta: Self::sum_to_shape(grad_out, &channels)?,
        })
    }
}

/// Validates `x [.., C]`, `gamma [C]`, `beta [C]`; returns the `[rows, 1, C, 1]` view and `C`.
fn layer_norm_view(op: &'static str, x: &Shape, gamma: &Shape, beta: &Shape) -> Result<(Shape, usize)> {
    let c = *x.dims().last().ok_or_else(|| Error::invalid(op, "layer norm needs at least one dim"))?;
    Shape::new([c]).expect_eq(op, gamma)?;
    Shape::new([c]).expect_eq(op, beta)?;
    let rows = x.num_elements()?.checked_div(c).ok_or(Error::Empty { op })?;
    Ok((Shape::new([rows, 1, c, 1]), c))
}

/// `γ = [1]`, `β = [0]` for the one-channel group norm inside the layer norm.
fn unit_affine<B: NormOps>(x: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
    let (dtype, device): (DType, _) = (B::dtype(x), B::device(x));
    Ok((B::full(&Shape::new([1]), 1.0, dtype, &device)?, B::zeros(&Shape::new([1]), dtype, &device)?))
}
