//! The tensor/backend traits every backend implements.
//!
//! Shaped after burn's backend traits, but far smaller: only what the trainer needs.
//! A backend names its device and tensor types ([`BackendTypes`]) and implements a handful
//! of op traits; [`Backend`] is the sum of them (blanket-implemented). Ops are static
//! functions on tensors passed by reference; tensors are cheap to clone (handles).
//!
//! Every op that can fail on caller input returns [`crate::Result`]; the shape checks are
//! shared ([`geometry`]), so all backends reject the same inputs the same way. Data crosses
//! the API as `f32`; a tensor's [`DType`] is its storage type.
//!
//! Each compound op (conv, group norm, upsample, softmax, the fused LISA and AdamW ops)
//! carries its own backward, so autodiff (in the trainer) never needs to know how a kernel
//! is written. Ops marked *default* are composed from the required ones; backends override
//! them with fused kernels where it pays.

mod arith;
mod attention;
mod collective;
mod dtype;
mod fused;
pub mod geometry;
mod layout;
mod linalg;
mod memory;
mod norm;
mod reduce;
mod shape;
mod tensor;
mod upsample_conv;

pub use crate::optim::AdamWParams;
pub use arith::{ArithOps, BinaryOp, UnaryOp};
pub use attention::{
    ATTENTION_SCORE_BUDGET, AttentionDims, AttentionForward, AttentionGrads, AttentionOps, AttentionParams,
    attention_backward_chunked, attention_chunked,
};
pub use collective::{Collective, Pending};
pub use dtype::{DType, HalfProducts};
pub use fused::FusedOps;
pub use geometry::{Conv2dParams, GroupNormParams, Transpose};
pub use layout::LayoutOps;
pub use linalg::{ConvOps, MatmulOps, broadcast_leading};
pub use memory::MemoryCapacity;
pub use norm::{GroupNormGrads, GroupNormOutput, NormOps};
pub use reduce::ReduceOps;
pub use shape::Shape;
pub use tensor::TensorOps;
pub use upsample_conv::{UpsampleConvOps, check_kernel as check_upsample_conv_kernel, upsampled_shape};

use core::fmt::Debug;

/// Every op trait in scope at once: `use lisa_core::backend::prelude::*;`.
pub mod prelude {
    pub use super::{
        ArithOps, AttentionOps, Backend, BackendTypes, ConvOps, FusedOps, LayoutOps, MatmulOps, NormOps, ReduceOps,
        TensorOps, UpsampleConvOps,
    };
}

/// The associated types of a backend: its device and its tensor handle.
pub trait BackendTypes: Clone + Debug + Default + Send + Sync + 'static {
    /// Where tensors live (a CPU thread pool, a GPU, …).
    type Device: Clone + Debug + PartialEq + Send + Sync;
    /// A tensor handle: shape, dtype and storage on a device. Cloning is cheap.
    type Tensor: Clone + Debug + Send + Sync;

    /// A short name for logs and benchmark tables (`"reference"`, `"cpu"`, `"wgpu"`).
    fn name() -> &'static str;
}

/// Everything the trainer needs from a backend.
pub trait Backend:
    TensorOps + ArithOps + ReduceOps + MatmulOps + ConvOps + NormOps + LayoutOps + FusedOps + AttentionOps + UpsampleConvOps
{
}

impl<B> Backend for B where
    B: TensorOps
        + ArithOps
        + ReduceOps
        + MatmulOps
        + ConvOps
        + NormOps
        + LayoutOps
        + FusedOps
        + AttentionOps
        + UpsampleConvOps
{
}
