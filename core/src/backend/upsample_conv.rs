use super::{Conv2dParams, ConvOps, LayoutOps, Shape};
use crate::{Error, Result};

/// Nearest ×2 upsampling followed by a 3×3 "same" convolution, as one op: the UNet's
/// `Upsample` block (and the LISA decoder's upsampling stages).
///
/// `y = conv2d(upsample_nearest(x, 2), w, b, pad 1)`, `x [n, c_in, h, w]`,
/// `w [c_out, c_in, 3, 3]`, `y [n, c_out, 2h, 2w]`.
///
/// The defaults compose [`LayoutOps::upsample_nearest`] and [`ConvOps`] exactly as written
/// (they are the reference's definition). A backend may override all three with a cheaper
/// equivalent: each output pixel of an upsampled 3×3 convolution reads only a 2×2 window of
/// `x`, so the product can run on the low-resolution input with 4 sub-pixel kernels
/// (16 taps per 2×2 output block instead of 36; lisa-cpu does this).
pub trait UpsampleConvOps: ConvOps + LayoutOps {
    /// *Default*: `conv2d(upsample_nearest(x, 2), w, b, pad 1)`.
    fn upsample_conv2d(x: &Self::Tensor, weight: &Self::Tensor, bias: Option<&Self::Tensor>) -> Result<Self::Tensor> {
        check_kernel("upsample_conv2d", &Self::shape(weight))?;
        Self::conv2d(&Self::upsample_nearest(x, 2)?, weight, bias, Conv2dParams::same(3))
    }

    /// *Default*: `∂L/∂x = upsample_backward(conv2d_backward_data(∂L/∂y, w))`, for an input of
    /// `input_shape` (`[n, c_in, h, w]`; `grad_out [n, c_out, 2h, 2w]`).
    fn upsample_conv2d_backward_data(
        grad_out: &Self::Tensor,
        weight: &Self::Tensor,
        input_shape: &Shape,
    ) -> Result<Self::Tensor> {
        const OP: &str = "upsample_conv2d_backward_data";
        check_kernel(OP, &Self::shape(weight))?;
        let up = upsampled_shape(OP, input_shape)?;
        let d_up = Self::conv2d_backward_data(grad_out, weight, &up, Conv2dParams::same(3))?;
        Self::upsample_nearest_backward(&d_up, 2)
    }

    /// *Default*: `∂L/∂w = conv2d_backward_weight(upsample_nearest(x, 2), ∂L/∂y)`.
    fn upsample_conv2d_backward_weight(
        x: &Self::Tensor,
        grad_out: &Self::Tensor,
        weight_shape: &Shape,
    ) -> Result<Self::Tensor> {
        check_kernel("upsample_conv2d_backward_weight", weight_shape)?;
        Self::conv2d_backward_weight(&Self::upsample_nearest(x, 2)?, grad_out, weight_shape, Conv2dParams::same(3))
    }
}

/// Refuses a kernel that is not `[c_out, c_in, 3, 3]`.
pub fn check_kernel(op: &'static str, weight: &Shape) -> Result<()> {
    match weight.dims() {
        [_, _, 3, 3] => Ok(()),
        d => Err(Error::invalid(op, alloc::format!("kernel {d:?} is not [c_out, c_in, 3, 3]"))),
    }
}

/// `[n, c, h, w] → [n, c, 2h, 2w]`, refusing other ranks and overflow.
pub fn upsampled_shape(op: &'static str, input: &Shape) -> Result<Shape> {
    input.expect_rank(op, 4)?;
    let d = input.dims();
    let twice = |v: usize| v.checked_mul(2).ok_or(Error::SizeOverflow { op });
    Ok(Shape::new([d[0], d[1], twice(d[2])?, twice(d[3])?]))
}
