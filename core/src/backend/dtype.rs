use core::fmt;

/// The storage type of a tensor. Data crosses the API as `f32`; a tensor stored as
/// `F16`/`BF16` holds values rounded to that type after every op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 (`half::f16`).
    F16,
    /// bfloat16 (`half::bf16`); unsupported on WGSL.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// `x` rounded to the nearest value of this type (round-to-nearest-even), as `f32`.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// How a device multiplies half-precision (`F16`/`BF16`) matrices: what autocast buys there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfProducts {
    /// On tensor cores (half inputs, f32 accumulation): faster than f32.
    TensorCores,
    /// Half storage, f32 arithmetic: half the memory traffic and activation memory, the same
    /// arithmetic speed as f32.
    F32Arithmetic,
}
