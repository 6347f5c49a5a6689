use super::geometry::{Conv2dParams, Transpose};
use super::{ArithOps, ReduceOps, Shape};
use crate::{Error, Result};

/// Batched matrix multiplication.
pub trait MatmulOps: ArithOps {
    /// `op(a) · op(b)` over the last two dims, `[.., m, k] × [.., k, n] → [.., m, n]`,
    /// with `op` the optional transpose; leading dims must be equal.
    fn matmul(a: &Self::Tensor, b: &Self::Tensor, transpose: Transpose) -> Result<Self::Tensor>;

    /// *Default*: [`MatmulOps::matmul`] with numpy broadcasting of the leading dims (torch's
    /// `matmul` for rank ≥ 2): `[.., m, k] × [.., k, n]`, the `..` broadcast together. An
    /// operand whose leading dims are not the broadcast ones is expanded first.
    fn matmul_broadcast(a: &Self::Tensor, b: &Self::Tensor, transpose: Transpose) -> Result<Self::Tensor> {
        const OP: &str = "matmul_broadcast";
        let (sa, sb) = (Self::shape(a), Self::shape(b));
        let lead = broadcast_leading(OP, &sa, &sb)?;
        let expand = |t: &Self::Tensor, s: &Shape| -> Result<Self::Tensor> {
            let want = Shape::new([lead.dims(), &s.dims()[s.rank() - 2..]].concat());
            if *s == want {
                Ok(t.clone())
            } else {
                Self::add(t, &Self::zeros(&want, Self::dtype(t), &Self::device(t))?)
            }
        };
        Self::matmul(&expand(a, &sa)?, &expand(b, &sb)?, transpose)
    }
}

/// The broadcast of the leading (all but the last two) dims of `a` and `b`.
pub fn broadcast_leading(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::invalid(op, alloc::format!("matmul needs rank >= 2, got {a} and {b}")));
    }
    let lead = |s: &Shape| Shape::new(s.dims()[..s.rank() - 2].to_vec());
    Shape::broadcast(op, &lead(a), &lead(b))
}

/// 2-D convolution (NCHW, cross-correlation as in torch) and its two backward kernels.
pub trait ConvOps: ReduceOps {
    /// `y[n, o, i, j] = b[o] + Σ_{c,u,v} x[n, c, s_h·i + u − p_h, s_w·j + v − p_w]·w[o, c, u, v]`;
    /// `x [n, c_in, h, w]`, `w [c_out, c_in, kh, kw]`, `bias [c_out]`.
    fn conv2d(
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// `∂L/∂x` from `∂L/∂y` (a transposed convolution), for an input of `input_shape`.
    fn conv2d_backward_data(
        grad_out: &Self::Tensor,
        weight: &Self::Tensor,
        input_shape: &Shape,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// `∂L/∂w[o, c, u, v] = Σ_{n,i,j} ∂L/∂y[n, o, i, j]·x[n, c, s_h·i + u − p_h, s_w·j + v − p_w]`.
    fn conv2d_backward_weight(
        x: &Self::Tensor,
        grad_out: &Self::Tensor,
        weight_shape: &Shape,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// *Default*: `∂L/∂b[o] = Σ_{n,i,j} ∂L/∂y[n, o, i, j]`, shape `[c_out]`.
    fn conv2d_backward_bias(grad_out: &Self::Tensor) -> Result<Self::Tensor> {
        let s = Self::shape(grad_out);
        s.expect_rank("conv2d_backward_bias", 4)?;
        let c = s.dims()[1];
        let summed = Self::sum_to_shape(grad_out, &Shape::new([1, c, 1, 1]))?;
        Self::reshape(&summed, &Shape::new([c]))
    }
}
