use super::TensorOps;
use super::geometry::GroupNormParams;
use crate::Result;

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

/// Group normalisation (Wu & He 2018) over `[n, c, *spatial]`.
pub trait NormOps: TensorOps {
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
}
