//! Reductions: shared-memory tree sums (fixed partition, so results do not depend on
//! timing), sums onto a broadcast shape, and the last-axis softmax.

use cubecl::prelude::*;

/// Sums the `CUBE_DIM` (a power of two) values of `shared` into `shared[0]`; every thread
/// of the cube must call it. (The stride is a runtime value: a comptime one would be
/// folded by the macro instead of halving in the loop.)
#[cube]
pub fn tree_sum(shared: &mut SharedMemory<f32>) {
    let mut s = CUBE_DIM / 2;
    while s > 0 {
        if UNIT_POS < s {
            let v = shared[(UNIT_POS + s) as usize];
            shared[UNIT_POS as usize] += v;
        }
        sync_cube();
        s /= 2;
    }
}

/// Stage 1 of a full sum: cube `c` sums the elements `i ≡ c·BLOCK + u (mod grid)`, squared
/// when `square`; `partial[c]` receives its sum (in `f32`).
#[cube(launch)]
pub fn partial_sums<F: Float>(
    x: &Array<F>,
    partial: &mut Array<f32>,
    #[comptime] block: u32,
    #[comptime] square: bool,
) {
    let mut shared = SharedMemory::<f32>::new(block as usize);
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut acc = 0.0f32;
    let mut i = ABSOLUTE_POS;
    while i < x.len() {
        let v = f32::cast_from(x[i]);
        if comptime![square] {
            acc += v * v;
        } else {
            acc += v;
        }
        i += stride;
    }
    shared[UNIT_POS as usize] = acc;
    sync_cube();
    tree_sum(&mut shared);
    if UNIT_POS == 0 {
        partial[CUBE_POS] = shared[0];
    }
}

/// Stage 2: one cube sums `partial` into `out[0]`.
#[cube(launch)]
pub fn finish_sum<F: Float>(partial: &Array<f32>, out: &mut Array<F>, #[comptime] block: u32) {
    let mut shared = SharedMemory::<f32>::new(block as usize);
    let mut acc = 0.0f32;
    let mut i = UNIT_POS as usize;
    while i < partial.len() {
        acc += partial[i];
        i += block as usize;
    }
    shared[UNIT_POS as usize] = acc;
    sync_cube();
    tree_sum(&mut shared);
    if UNIT_POS == 0 {
        out[0] = F::cast_from(shared[0]);
    }
}

/// `out[o] = Σ x[i]` over the `i` that broadcast onto `o`. For rank `r`, `meta` holds the
/// output dims padded to rank `r`, the reduced dims (input dim where the output has 1, else
/// 1), and the input strides. One thread per output element.
#[cube(launch)]
pub fn sum_to_shape<F: Float>(x: &Array<F>, out: &mut Array<F>, meta: &Array<u32>, rank: u32, reduced: u32) {
    if ABSOLUTE_POS < out.len() {
        let r = rank as usize;
        let mut base = 0usize;
        let mut rem = ABSOLUTE_POS;
        for k in 0..r {
            let d = r - 1 - k;
            let size = meta[d] as usize;
            base += (rem % size) * meta[2 * r + d] as usize;
            rem /= size;
        }
        let mut acc = 0.0f32;
        for j in 0..reduced as usize {
            let mut offset = base;
            let mut q = j;
            for k in 0..r {
                let d = r - 1 - k;
                let size = meta[r + d] as usize;
                offset += (q % size) * meta[2 * r + d] as usize;
                q /= size;
            }
            acc += f32::cast_from(x[offset]);
        }
        out[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

/// Softmax over rows of length `d`, one thread per row (max-subtracted).
#[cube(launch)]
pub fn softmax_last<F: Float>(x: &Array<F>, out: &mut Array<F>, d: u32, rows: u32) {
    let row = ABSOLUTE_POS;
    if row < rows as usize {
        let n = d as usize;
        let base = row * n;
        let mut m = f32::cast_from(x[base]);
        for i in 1..n {
            m = f32::max(m, f32::cast_from(x[base + i]));
        }
        let mut total = 0.0f32;
        for i in 0..n {
            total += f32::exp(f32::cast_from(x[base + i]) - m);
        }
        for i in 0..n {
            out[base + i] = F::cast_from(f32::exp(f32::cast_from(x[base + i]) - m) / total);
        }
    }
}

/// `dx = y ⊙ (g − ⟨g, y⟩)` per row.
#[cube(launch)]
pub fn softmax_last_backward<F: Float>(y: &Array<F>, g: &Array<F>, out: &mut Array<F>, d: u32, rows: u32) {
    let row = ABSOLUTE_POS;
    if row < rows as usize {
        let n = d as usize;
        let base = row * n;
        let mut dot = 0.0f32;
        for i in 0..n {
            dot += f32::cast_from(y[base + i]) * f32::cast_from(g[base + i]);
        }
        for i in 0..n {
            let yi = f32::cast_from(y[base + i]);
            out[base + i] = F::cast_from(yi * (f32::cast_from(g[base + i]) - dot));
        }
    }
}
