//! Vectorisable reductions: a sequential float sum cannot be reordered by the compiler, so
//! these keep 8 independent f64 partial sums (one per SIMD lane) and add them at the end.
//! The order is fixed, so results stay deterministic.

const LANES: usize = 8;

/// `Σ f(xᵢ)` accumulated in f64 over 8 lanes.
#[inline(always)]
pub(crate) fn sum_map(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| f(v)).sum::<f64>()
}

/// `Σ f(xᵢ, yᵢ)` accumulated in f64 over 8 lanes.
#[inline(always)]
pub(crate) fn sum_zip(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (cx, cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (tx, ty) = (cx.remainder(), cy.remainder());
    for (a8, b8) in cx.zip(cy) {
        for ((a, &u), &v) in acc.iter_mut().zip(a8).zip(b8) {
            *a += f(u, v);
        }
    }
    acc.iter().sum::<f64>() + tx.iter().zip(ty).map(|(&u, &v)| f(u, v)).sum::<f64>()
}
