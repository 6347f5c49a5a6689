//! The scalar type the math is generic over (`f32` for training, `f64` for oracles).

use core::fmt::{Debug, Display};
use num_traits::{Float, FloatConst};

/// A real floating-point scalar: [`num_traits::Float`] plus lossless-enough literals.
pub trait Real: Float + FloatConst + Debug + Display + Default + Send + Sync + 'static {
    /// The value nearest to `x` (rounding `f64` to the type).
    fn lit(x: f64) -> Self;
    /// The value as `f64` (exact for `f32` and `f64`).
    fn to_f64_lossless(self) -> f64;
}

impl Real for f32 {
    #[inline]
    fn lit(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline]
    fn lit(x: f64) -> Self {
        x
    }
    #[inline]
    fn to_f64_lossless(self) -> f64 {
        self
    }
}
