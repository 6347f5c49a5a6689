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
    /// Every multiply-add in f32 (this crate's tiled kernel, no tensor cores): what the CPU
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

/// The kernel that computes one f32 product.
pub(crate) enum F32Gemm {
    /// One of cubek's matmul strategies.
    Cubek(cubek::matmul::launch::Strategy),
    /// This crate's shared-memory tiled kernel.
    Tiled,
}

/// The names `LISA_CUBECL_F32_GEMM` accepts.
pub const F32_GEMM_KERNELS: &[&str] = &[
    "tiled",
    "simple_unit",
    "double_unit",
    "auto",
    "simple_cyclic_cmma",
    "double_cyclic_cmma",
    "ordered_double_cmma",
    "simple_tma_cmma",
    "specialized_tma_cmma",
];

/// The f32 GEMM kernel: `LISA_CUBECL_F32_GEMM` when set (a benchmarking knob: one of
/// [`F32_GEMM_KERNELS`]; the `cmma` ones and `auto` round operands to TF32 where the GPU has
/// TF32 tensor cores), else this crate's tiled kernel for [`F32Matmul::Exact`] and cubek's
/// `Auto` strategy for [`F32Matmul::Tf32`]. An unknown name is an error naming the known ones.
///
/// Why the tiled kernel for exact f32: measured side by side (`scripts/device_check.sh gemm`),
/// the toy's step on a GPU was faster with it than with cubek's unit matmul and about as fast
/// as with cubek's TF32 tensor-core strategies, and on lavapipe (wgpu on the CPU) the
/// conformance suite ran several times faster with it (figures and GPU in the lisa-cubecl
/// README).
pub(crate) fn f32_gemm() -> Result<F32Gemm, String> {
    use cubek::matmul::launch::Strategy as S;
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var("LISA_CUBECL_F32_GEMM").ok().filter(|s| !s.is_empty()));
    match chosen {
        Some(name) => f32_gemm_named(name),
        None => Ok(match f32_matmul() {
            F32Matmul::Exact => F32Gemm::Tiled,
            F32Matmul::Tf32 => F32Gemm::Cubek(S::Auto),
        }),
    }
}

/// The kernel called `name` (one of [`F32_GEMM_KERNELS`]).
fn f32_gemm_named(name: &str) -> Result<F32Gemm, String> {
    use cubek::matmul::launch::Strategy as S;
    Ok(match name {
        "tiled" => F32Gemm::Tiled,
        "simple_unit" => F32Gemm::Cubek(S::SimpleUnit(Default::default())),
        "double_unit" => F32Gemm::Cubek(S::DoubleUnit(Default::default())),
        "auto" => F32Gemm::Cubek(S::Auto),
        "simple_cyclic_cmma" => F32Gemm::Cubek(S::SimpleCyclicCmma(Default::default())),
        "double_cyclic_cmma" => F32Gemm::Cubek(S::DoubleCyclicCmma(Default::default())),
        "ordered_double_cmma" => F32Gemm::Cubek(S::OrderedDoubleCmma(Default::default())),
        "simple_tma_cmma" => F32Gemm::Cubek(S::SimpleTmaCmma(Default::default())),
        "specialized_tma_cmma" => F32Gemm::Cubek(S::SpecializedTmaCmma(Default::default())),
        other => {
            return Err(format!(
                "LISA_CUBECL_F32_GEMM={other:?} is not a kernel (known: {})",
                F32_GEMM_KERNELS.join(", ")
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_has_a_name_and_unknown_names_are_refused() {
        for name in F32_GEMM_KERNELS {
            assert!(f32_gemm_named(name).is_ok(), "{name}");
        }
        let Err(message) = f32_gemm_named("cublas") else { panic!("an unknown kernel was accepted") };
        assert!(message.contains("\"cublas\"") && message.contains("tiled, simple_unit"), "{message}");
    }

    #[test]
    fn the_process_setting_round_trips() {
        assert_eq!(f32_matmul(), F32Matmul::Exact, "exact f32 is the default");
        set_f32_matmul(F32Matmul::Tf32);
        assert_eq!(f32_matmul(), F32Matmul::Tf32);
        set_f32_matmul(F32Matmul::Exact);
        assert_eq!(f32_matmul(), F32Matmul::Exact);
    }
}
