//! The numerical tolerances of the project's tests, named per dtype, in one place.
//!
//! A check passes when `|got − want| ≤ abs + rel·|want|`. The core's property tests, the
//! reference backend's tests and the backend conformance suite all read these.

use crate::backend::DType;

/// An absolute + relative tolerance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part (times `|want|`).
    pub rel: f64,
}

impl Tolerance {
    /// Whether `got` is within tolerance of `want` (NaN never is).
    pub fn accepts(&self, got: f64, want: f64) -> bool {
        (got - want).abs() <= self.abs + self.rel * want.abs()
    }
}

/// Closed-form `f64` math (conversions, round trips, decomposition identities).
pub const F64_MATH: Tolerance = Tolerance { abs: 1e-10, rel: 1e-9 };

/// Analytic gradient vs central finite difference in `f64` (step [`FD_STEP_F64`]).
pub const F64_FINITE_DIFFERENCE: Tolerance = Tolerance { abs: 1e-7, rel: 1e-5 };

/// Central-difference step for `f64` gradient checks.
pub const FD_STEP_F64: f64 = 1e-6;

/// Analytic gradient vs central finite difference of an `f32` op (step [`FD_STEP_F32`]),
/// the difference taken in `f64` over the op's `f32` outputs.
pub const F32_FINITE_DIFFERENCE: Tolerance = Tolerance { abs: 2e-3, rel: 1e-2 };

/// Central-difference step for `f32` gradient checks.
pub const FD_STEP_F32: f64 = 1e-2;

/// A backend op against the reference, by storage dtype (accumulation-order and
/// rounding differences only; reductions over ≤ 10⁴ terms).
pub fn backend_vs_reference(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => Tolerance { abs: 1e-4, rel: 1e-4 },
        DType::F16 => Tolerance { abs: 2e-2, rel: 1e-2 },
        DType::BF16 => Tolerance { abs: 1e-1, rel: 5e-2 },
    }
}

/// The same few training steps on two backends, `f32`: per-step losses. Differences are
/// accumulation order amplified by the optimizer (AdamW normalises tiny gradients, so a
/// last-bit difference in one can move a weight by up to 2·lr), hence looser than one op.
pub const TRAINING_LOSS_F32: Tolerance = Tolerance { abs: 1e-4, rel: 2e-3 };

/// The same few training steps on two backends, `f32`: every trained parameter afterwards
/// (absolute: AdamW moves each weight by at most ≈ lr per step, whatever its size).
pub const TRAINING_PARAMS_F32: Tolerance = Tolerance { abs: 2e-3, rel: 1e-3 };

/// A data-parallel run of N ranks against one rank with the N-times batch, `f32`, a few
/// steps: per-step losses and gradient norms (only the gradients' summation order differs).
pub const DATA_PARALLEL_LOSS_F32: Tolerance = Tolerance { abs: 1e-6, rel: 1e-5 };

/// The same comparison, every trained parameter afterwards (AdamW moves each weight by at
/// most ≈ lr per step, so a reordered sum moves it by far less).
pub const DATA_PARALLEL_PARAMS_F32: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };

/// lisa's models against the reference implementation's outputs (diffusers/PyTorch golden
/// files), `f32` on any backend: `max |got − want| ≤ rel·max |want|` over each tensor (the
/// tensor's scale, so that near-zero elements of a large output do not dominate).
pub const REFERENCE_PARITY_F32: f64 = 1e-4;

/// An autocast training run (`mixed_precision = bf16 | fp16`) against the same run in `f32`:
/// per-step losses of the tiny SD fixture over 20 AdamW steps. Each product rounds its inputs
/// to the half type (2⁻⁹ relative for bf16, 2⁻¹² for fp16), and the difference compounds
/// through the trained weights. Measured on lisa-cpu: at most 6.2e-3 (bf16) and 9.0e-4 (fp16)
/// relative; the bounds leave about 5× room.
pub fn autocast_training_loss(dtype: DType) -> Tolerance {
    match dtype {
        DType::F32 => TRAINING_LOSS_F32,
        DType::F16 => Tolerance { abs: 1e-4, rel: 5e-3 },
        DType::BF16 => Tolerance { abs: 1e-3, rel: 3e-2 },
    }
}
