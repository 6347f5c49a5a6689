//! The reference implementation: every backend op as plain loops over slices.
//!
//! Two uses: it is the **oracle** the conformance suite compares every backend with
//! (accumulations in `f64`, no tiling, no threads, written for obviousness), and it is the
//! **embedding path**: the slice functions here take buffers the caller owns, so another
//! framework can call them on its own tensors' storage. [`RefBackend`] wraps them in the
//! backend traits.

mod backend;
mod conv;
mod elementwise;
mod layout;
mod matmul;
mod norm;
mod softmax;

pub use backend::{RefBackend, RefDevice, RefTensor};
pub use conv::{conv2d, conv2d_backward_data, conv2d_backward_weight};
pub use elementwise::{binary_broadcast, sum_to_shape};
pub use layout::{concat_channels, slice_channels, upsample_nearest, upsample_nearest_backward};
pub use matmul::matmul;
pub use norm::{group_norm, group_norm_backward};
pub use softmax::{softmax_last, softmax_last_backward};

use crate::backend::Shape;
use crate::{Error, Result};

/// Fails unless `data` holds exactly the elements of `shape`.
pub(crate) fn expect_len(op: &'static str, data: &[f32], shape: &Shape) -> Result<()> {
    let n = shape.num_elements()?;
    if data.len() != n {
        return Err(Error::LengthMismatch { op, expected: n, got: data.len() });
    }
    Ok(())
}
