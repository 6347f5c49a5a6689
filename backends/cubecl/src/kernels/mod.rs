//! The `#[cube]` kernels, one concern per file. Every kernel reads its storage type `F`,
//! computes in `f32` and rounds once when it stores. Host-side launch code is in
//! [`crate::backend`]; grid sizing in [`crate::launch`].

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod fused;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod random;
pub mod reduce;

/// Threads per cube of the 1-D kernels and of the tree reductions (a power of two).
pub const BLOCK: u32 = 256;
