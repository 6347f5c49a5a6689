//! How f32 matrix products run: exactly in f32 (the default), or with TF32 tensor cores.
//!
//! On GPUs with TF32 tensor cores (NVIDIA Ampere and later) cubek's fastest f32 matmul rounds
//! both operands to TF32 (a 10-bit mantissa, relative error up to 2⁻¹¹ per operand) and
//! accumulates in f32. That is faster, but a product of two numbers already differs from the
//! CPU reference by ~5e-4, beyond the f32 tolerance of the conformance suite. So, as PyTorch
//! does for `torch.matmul` (`torch.backends.cuda.matmul.allow_tf32 = False`), every f32
//! product is exact unless the process opts in. The setting is process-wide, like PyTorch's,
//! so that every tensor of every device follows it.

use core::sync::atomic::{AtomicBool, Ordering};

/// How f32 matrix products (matmul, the convolutions' GEMMs) are computed on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum F32Matmul {
    /// Every multiply-add in f32 (cubek's unit matmul, no tensor cores): what the CPU
    /// backends compute, within the f32 conformance tolerance.
    #[default]
    Exact,
    /// Operands rounded to TF32 on tensor cores where the GPU has them (f32 accumulation);
    /// elsewhere the same as [`F32Matmul::Exact`]. Relative error of a product up to ~1e-3.
    Tf32,
}

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);

/// Sets how f32 matrix products run from now on, in this process.
pub fn set_f32_matmul(mode: F32Matmul) {
    ALLOW_TF32.store(mode == F32Matmul::Tf32, Ordering::Relaxed);
}

/// How f32 matrix products run now.
pub fn f32_matmul() -> F32Matmul {
    if ALLOW_TF32.load(Ordering::Relaxed) { F32Matmul::Tf32 } else { F32Matmul::Exact }
}
