//! Grid sizing and dtype dispatch shared by every launch.

use cubecl::prelude::*;

use crate::kernels::BLOCK;

/// Cubes along x before spilling into y (the WebGPU/Vulkan minimum for any dimension).
const MAX_CUBES_X: u32 = 65_535;

/// A 1-D grid of `BLOCK`-thread cubes covering `units` threads (`ABSOLUTE_POS` is linear
/// over x and y, so large grids spill into y).
pub fn grid_1d(units: usize) -> (CubeCount, CubeDim) {
    let cubes = units.div_ceil(BLOCK as usize).max(1) as u32;
    let x = cubes.min(MAX_CUBES_X);
    (CubeCount::Static(x, cubes.div_ceil(x), 1), CubeDim::new_1d(BLOCK))
}

/// Lanes per thread for an elementwise kernel over `len` elements: 4 when it divides.
pub fn vector_width(len: usize) -> usize {
    if len.is_multiple_of(4) { 4 } else { 1 }
}

/// Runs `$body` with the type alias `$F` bound to the storage type of `$dtype`.
macro_rules! with_float {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            lisa_core::backend::DType::F32 => {
                type $F = f32;
                $body
            }
            lisa_core::backend::DType::F16 => {
                type $F = half::f16;
                $body
            }
            lisa_core::backend::DType::BF16 => {
                type $F = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_float;
