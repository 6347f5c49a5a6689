//! Batched matmul `C[b] = op(A[b])·op(B[b])` with `TILE×TILE` shared-memory tiles; the
//! transposes are strides, so no operand is ever copied.

use cubecl::prelude::*;

/// Tile side: a cube is `TILE×TILE` threads, one output element each.
pub const TILE: u32 = 16;

/// `a` is read as `m×k` with element `(i, p)` at `i·a_row + p·a_col`; `b` as `k×n` with
/// `(p, j)` at `p·b_row + j·b_col`. Grid: x over column tiles, y over row tiles, z over
/// the batch. Accumulates in `f32`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    c: &mut Array<F>,
    m: u32,
    k: u32,
    n: u32,
    a_row: u32,
    a_col: u32,
    b_row: u32,
    b_col: u32,
    #[comptime] tile: u32,
) {
    let t = tile as usize;
    let mut sa = SharedMemory::<f32>::new(t * t);
    let mut sb = SharedMemory::<f32>::new(t * t);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let row = CUBE_POS_Y as usize * t + ty;
    let col = CUBE_POS_X as usize * t + tx;
    let batch = CUBE_POS_Z as usize;
    let mm = m as usize;
    let kk = k as usize;
    let nn = n as usize;
    let a_base = batch * mm * kk;
    let b_base = batch * kk * nn;
    let mut acc = 0.0f32;
    let steps = kk.div_ceil(t);
    for s in 0..steps {
        let ka = s * t + tx;
        let mut va = 0.0f32;
        if row < mm && ka < kk {
            va = f32::cast_from(a[a_base + row * a_row as usize + ka * a_col as usize]);
        }
        sa[ty * t + tx] = va;
        let kb = s * t + ty;
        let mut vb = 0.0f32;
        if kb < kk && col < nn {
            vb = f32::cast_from(b[b_base + kb * b_row as usize + col * b_col as usize]);
        }
        sb[ty * t + tx] = vb;
        sync_cube();
        for p in 0..t {
            acc += sa[ty * t + p] * sb[p * t + tx];
        }
        sync_cube();
    }
    if row < mm && col < nn {
        c[batch * mm * nn + row * nn + col] = F::cast_from(acc);
    }
}

/// `out[b, j, i] = x[b, i, j]` for `x` of shape `[batch, rows, cols]`.
#[cube(launch)]
pub fn transpose<F: Float>(x: &Array<F>, out: &mut Array<F>, rows: u32, cols: u32) {
    if ABSOLUTE_POS < out.len() {
        let r = rows as usize;
        let c = cols as usize;
        let i = ABSOLUTE_POS % r;
        let j = (ABSOLUTE_POS / r) % c;
        let b = ABSOLUTE_POS / (r * c);
        out[ABSOLUTE_POS] = x[(b * r + i) * c + j];
    }
}
