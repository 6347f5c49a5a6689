//! Fused training ops on the CPU: MSE loss, the LISA term, the AdamW update.

use lisa_core::Result;
use lisa_core::optim::{AdamWParams, AdamWStep};
use rayon::prelude::*;

use crate::CHUNK;
use crate::simd::vectorised;

/// `(mean((p − y)²), 2(p − y)/N)` in one pass (f64 partials per fixed chunk).
pub(crate) fn mse_loss(p: &[f32], y: &[f32]) -> (f64, Vec<f32>) {
    let scale = 2.0 / p.len() as f32;
    let mut grad = vec![0.0f32; p.len()];
    let partials: Vec<f64> = grad
        .par_chunks_mut(CHUNK)
        .zip(p.par_chunks(CHUNK))
        .zip(y.par_chunks(CHUNK))
        .map(|((g, p), y)| {
            let mut s = 0.0f64;
            for ((g, &p), &y) in g.iter_mut().zip(p).zip(y) {
                let d = p - y;
                s += (d as f64) * (d as f64);
                *g = scale * d;
            }
            s
        })
        .collect();
    (partials.iter().sum::<f64>() / p.len() as f64, grad)
}

/// One AdamW step in place, in parallel chunks (elementwise, so any partition is exact).
pub(crate) fn adamw(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], hp: &AdamWParams) -> Result<()> {
    let step = AdamWStep::new(hp)?;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| vectorised(|| step.apply_slices(p, m, v, g)));
    Ok(())
}
