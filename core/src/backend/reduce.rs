use super::{ArithOps, Shape, UnaryOp};
use crate::Result;

/// Reductions and the softmax.
pub trait ReduceOps: ArithOps {
    /// `Σ t` over all elements, shape `[]`.
    fn sum(t: &Self::Tensor) -> Result<Self::Tensor>;

    /// Sums `t` down to `shape`, the inverse of broadcasting `shape` to `t`'s shape
    /// (the backward of a broadcast binary op). `shape` must broadcast to `t`'s shape.
    fn sum_to_shape(t: &Self::Tensor, shape: &Shape) -> Result<Self::Tensor>;

    /// Softmax over the last dimension: `y_i = exp(x_i − max x) / Σ_j exp(x_j − max x)`.
    fn softmax_last(t: &Self::Tensor) -> Result<Self::Tensor>;

    /// Backward of the softmax from its output `y`: `dx = y ⊙ (g − Σ_last(g ⊙ y))`.
    fn softmax_last_backward(y: &Self::Tensor, grad: &Self::Tensor) -> Result<Self::Tensor>;

    /// *Default*: `(1/N)·Σ t`, shape `[]`.
    fn mean(t: &Self::Tensor) -> Result<Self::Tensor> {
        let n = Self::shape(t).num_elements()?;
        if n == 0 {
            return Err(crate::Error::Empty { op: "mean" });
        }
        Self::scale(&Self::sum(t)?, 1.0 / n as f32)
    }

    /// *Default*: `Σ t²` (for gradient-norm clipping), shape `[]`.
    fn sum_squares(t: &Self::Tensor) -> Result<Self::Tensor> {
        Self::sum(&Self::unary(UnaryOp::Square, t)?)
    }
}
