//! The one error type of the core: every op that can fail on caller input returns it.

use alloc::string::String;
use core::fmt;

use crate::backend::{DType, Shape};

/// What went wrong, with the operation that noticed it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors (or a tensor and a required shape) disagree.
    ShapeMismatch {
        /// The operation that checked.
        op: &'static str,
        /// The shape that was required (or the left operand).
        expected: Shape,
        /// The shape that was given (or the right operand).
        got: Shape,
    },
    /// Two buffers, or a buffer and its declared size, disagree in length.
    LengthMismatch {
        /// The operation that checked.
        op: &'static str,
        /// The required length.
        expected: usize,
        /// The given length.
        got: usize,
    },
    /// Operands of different storage types.
    DTypeMismatch {
        /// The operation that checked.
        op: &'static str,
        /// The left / required dtype.
        expected: DType,
        /// The right / given dtype.
        got: DType,
    },
    /// The backend (or device) cannot hold or compute this dtype.
    UnsupportedDType {
        /// The operation that checked.
        op: &'static str,
        /// The rejected dtype.
        dtype: DType,
    },
    /// An input had no elements where at least one is required.
    Empty {
        /// The operation that checked.
        op: &'static str,
    },
    /// A size computation overflowed `usize`.
    SizeOverflow {
        /// The operation that checked.
        op: &'static str,
    },
    /// A scalar argument is out of its domain (negative λ, t outside [0, 1], …).
    InvalidArgument {
        /// The operation that checked.
        op: &'static str,
        /// What is wrong, in words.
        reason: String,
    },
    /// A noise level at which the requested conversion divides by zero
    /// (e.g. ε → x₀ needs α ≠ 0; a score needs σ ≠ 0).
    DegenerateNoiseLevel {
        /// The operation that checked.
        op: &'static str,
        /// α_t of the level.
        alpha: f64,
        /// σ_t of the level.
        sigma: f64,
    },
    /// A loss or reduction produced NaN or ±∞ (diverged training, bad inputs).
    NonFinite {
        /// The operation that checked.
        op: &'static str,
    },
    /// A failure inside a backend (device lost, kernel launch failed, …).
    Backend {
        /// The operation that failed.
        op: &'static str,
        /// The backend's message.
        message: String,
    },
}

/// `Result` with the core [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { op, reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch { op, expected, got } => {
                write!(f, "{op}: shape mismatch: expected {expected}, got {got}")
            }
            Error::LengthMismatch { op, expected, got } => {
                write!(f, "{op}: length mismatch: expected {expected} elements, got {got}")
            }
            Error::DTypeMismatch { op, expected, got } => {
                write!(f, "{op}: dtype mismatch: expected {expected}, got {got}")
            }
            Error::UnsupportedDType { op, dtype } => {
                write!(f, "{op}: dtype {dtype} is not supported by this backend/device")
            }
            Error::Empty { op } => write!(f, "{op}: input has no elements"),
            Error::SizeOverflow { op } => write!(f, "{op}: tensor size overflows usize"),
            Error::InvalidArgument { op, reason } => write!(f, "{op}: invalid argument: {reason}"),
            Error::DegenerateNoiseLevel { op, alpha, sigma } => {
                write!(f, "{op}: conversion undefined at noise level alpha={alpha}, sigma={sigma}")
            }
            Error::NonFinite { op } => write!(f, "{op}: result is NaN or infinite"),
            Error::Backend { op, message } => write!(f, "{op}: backend error: {message}"),
        }
    }
}

impl core::error::Error for Error {}
