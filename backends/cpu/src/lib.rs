//! # lisa-cpu
//!
//! The default `lisa` backend: every op of the [`lisa_core::backend`] traits on the CPU in
//! `f32` (with `f16`/`bf16` storage), multi-threaded with rayon, GEMM from the `gemm` crate,
//! 2-D convolutions as im2col + GEMM (and plain GEMM for 1×1 kernels), attention fused and
//! tiled (no `[t_q, t_k]` score matrix in memory, forward or backward).
//!
//! Threads: ops run on the current rayon pool (the global one, sized by
//! `RAYON_NUM_THREADS`, or any pool the caller `install`s). Results do not depend on the
//! thread count: every reduction uses a fixed partition of the data and sums the parts in a
//! fixed order, and random numbers are counter-based ([`lisa_core::rng`]).

mod allocator;
mod attention;
mod backend;
mod conv;
mod elementwise;
mod fused;
mod gemm;
mod layout;
mod norm;
mod reduce;
mod simd;
mod sums;
mod tensor;
mod uninit;
mod upsample_conv;

pub use allocator::keep_freed_memory;
pub use backend::{CpuBackend, CpuDevice};
pub use simd::{Isa, detected_isa, isa, set_isa_cap};
pub use tensor::CpuTensor;

/// Elements per parallel task for memory-bound elementwise work (fixed, so that chunked
/// reductions are independent of the thread count).
pub(crate) const CHUNK: usize = 1 << 14;
