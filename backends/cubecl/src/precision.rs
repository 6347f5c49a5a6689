//! How matrix products run: f32 ones exactly in f32 (the default) or with TF32 tensor cores;
//! f16/bf16 ones on tensor cores with f32 accumulation where the device has them.
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

/// The kernel of f16/bf16 products: `LISA_CUBECL_HALF_GEMM` when set (a benchmarking and
/// testing knob, one of [`F32_GEMM_KERNELS`] but `auto`), else cubek's simple cyclic CMMA
/// matmul (half inputs on tensor cores, f32 accumulation, half output: autocast's products)
/// where the device has tensor cores for the type, else this crate's tiled kernel (which
/// also reads half and accumulates in f32, on CUDA cores). A cubek kernel that refuses a
/// problem falls back to the tiled one ([`half_matmul`] says which path a device takes).
pub(crate) fn half_gemm(tensor_cores: bool) -> Result<F32Gemm, String> {
    use cubek::matmul::launch::Strategy as S;
    match half_gemm_named() {
        // cubek's `Auto` panics on some refusals instead of returning them.
        Some("auto") => Err("LISA_CUBECL_HALF_GEMM=\"auto\" is not offered for half products; name a kernel".into()),
        Some(name) => f32_gemm_named(name).map_err(|m| m.replace("LISA_CUBECL_F32_GEMM", "LISA_CUBECL_HALF_GEMM")),
        None if tensor_cores => Ok(F32Gemm::Cubek(S::SimpleCyclicCmma(Default::default()))),
        None => Ok(F32Gemm::Tiled),
    }
}

/// `LISA_CUBECL_HALF_GEMM`, read once per process.
fn half_gemm_named() -> Option<&'static str> {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHOSEN.get_or_init(|| std::env::var("LISA_CUBECL_HALF_GEMM").ok().filter(|s| !s.is_empty())).as_deref()
}

static CUBEK_REFUSALS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Counts a product cubek refused (it then ran on the tiled kernel).
pub(crate) fn count_cubek_refusal() {
    CUBEK_REFUSALS.fetch_add(1, Ordering::Relaxed);
}

/// How many matrix products in this process were meant for a cubek kernel (TF32 or half
/// tensor cores, or the one `LISA_CUBECL_*_GEMM` names) and ran on the tiled kernel because
/// cubek refused the problem: 0 means every one ran where it was sent.
pub fn cubek_refusals() -> u64 {
    CUBEK_REFUSALS.load(Ordering::Relaxed)
}

/// Which kernel an f16/bf16 matrix product runs on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfMatmul {
    /// cubek's CMMA matmul on tensor cores, f32 accumulation.
    TensorCores,
    /// This crate's tiled kernel: half storage, f32 arithmetic on CUDA cores (no tensor
    /// cores for the type on this device, or `LISA_CUBECL_HALF_GEMM=tiled`).
    Tiled,
    /// The cubek kernel `LISA_CUBECL_HALF_GEMM` names.
    Named,
}

/// The path f16/bf16 (`dtype`) products take on `device` (a problem cubek refuses still
/// falls back to [`HalfMatmul::Tiled`]). For f32 see [`f32_matmul`].
pub fn half_matmul<R: cubecl::Runtime>(device: &crate::CubeDevice<R>, dtype: lisa_core::DType) -> HalfMatmul {
    match (half_gemm_named(), device.has_tensor_cores(dtype)) {
        (Some("tiled"), _) => HalfMatmul::Tiled,
        (Some(_), _) => HalfMatmul::Named,
        (None, true) => HalfMatmul::TensorCores,
        (None, false) => HalfMatmul::Tiled,
    }
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
