//! Fused (flash-style) attention: forward and backward in tiles, never a `[t_q, t_k]` score
//! matrix in memory.
//!
//! Forward (FlashAttention-2's loop order): for a block of `BLOCK_Q` query rows, stream the
//! keys in blocks of `BLOCK_K`; per block `S = s·Q_b·K_bᵀ` (GEMM), an online softmax (running
//! row max `m` and sum `l`, the accumulator rescaled by `e^{m_old − m_new}`), `O_b += P·V_b`
//! (GEMM); at the end `O = O_b / l` and the row's log-sum-exp `L = m + ln l` is kept.
//!
//! Backward: `D_i = Σ_c dO_ic·O_ic`; for a chunk of `KEY_CHUNK` keys and every query block,
//! `P = e^{s·QKᵀ − L}` (recomputed), `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − D)`,
//! `dK += s·dSᵀ·Q` and a per-chunk partial `dQ += s·dS·K`; the partials are summed in chunk
//! order. Every output element is written by one task in a fixed order, so results do not
//! depend on the thread count. Scratch per task: one `BLOCK_Q × BLOCK_K` tile (two in the
//! backward) and the block's accumulators; the partial `dQ`s hold `⌈t_k / KEY_CHUNK⌉` copies
//! of `dQ`.

use lisa_core::backend::{AttentionDims, AttentionParams};
use rayon::prelude::*;

use crate::gemm::{MatRef, gemm_into};

/// Query rows per task.
const BLOCK_Q: usize = 64;
/// Keys per tile.
const BLOCK_K: usize = 256;
/// Keys per backward task (each owns its keys' `dK`, `dV` and a partial `dQ`).
const KEY_CHUNK: usize = 1024;

/// `(O [g, t_q, d_v], L [g, t_q])` for row-major `q [g, t_q, d]`, `k [g, t_k, d]`, `v [g, t_k, d_v]`.
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: AttentionDims,
    params: AttentionParams,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionDims { groups, queries: tq, keys: tk, head_dim: d, value_dim: dv } = dims;
    let mut out = vec![0.0f32; groups * tq * dv];
    let mut lse = vec![0.0f32; groups * tq];
    out.par_chunks_mut(tq * dv).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(g, (out_g, lse_g))| {
        let (q_g, k_g, v_g) = (&q[g * tq * d..][..tq * d], &k[g * tk * d..][..tk * d], &v[g * tk * dv..][..tk * dv]);
        out_g.par_chunks_mut(BLOCK_Q * dv).zip(lse_g.par_chunks_mut(BLOCK_Q)).enumerate().for_each(
            |(b, (out_b, lse_b))| {
                let r0 = b * BLOCK_Q;
                let rows = lse_b.len();
                forward_block(&q_g[r0 * d..][..rows * d], k_g, v_g, (r0, d, dv), params, out_b, lse_b);
            },
        );
    });
    (out, lse)
}

/// One block of `rows = lse.len()` query rows starting at row `r0`: `out [rows, d_v]`, `lse [rows]`.
fn forward_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (r0, d, dv): (usize, usize, usize),
    params: AttentionParams,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let rows = lse.len();
    let keys = visible_keys(k.len() / d, r0 + rows, params.causal);
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0.0f32; rows];
    let mut tile = vec![0.0f32; rows * BLOCK_K]; // [rows, cols]: scores, then probabilities
    for c0 in (0..keys).step_by(BLOCK_K) {
        let cols = BLOCK_K.min(keys - c0);
        let tile = &mut tile[..rows * cols];
        // S = Q_b·K_bᵀ: [rows, d] × [d, cols]
        let k_b = MatRef::transposed(&k[c0 * d..][..cols * d], d, cols);
        gemm_into(tile, false, MatRef::row_major(q, rows, d), k_b, false);
        for (i, s_row) in tile.chunks_mut(cols).enumerate() {
            let last = last_visible(r0 + i, c0, cols, params.causal);
            let row_max = s_row[..last].iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * params.scale));
            let new_max = max[i].max(row_max);
            // The first tile holds key 0, which every row sees: `new_max` is finite from then on.
            let alpha = (max[i] - new_max).exp();
            let mut row_sum = 0.0f32;
            for s in &mut s_row[..last] {
                *s = (*s * params.scale - new_max).exp();
                row_sum += *s;
            }
            s_row[last..].fill(0.0);
            sum[i] = sum[i] * alpha + row_sum;
            max[i] = new_max;
            out[i * dv..][..dv].iter_mut().for_each(|o| *o *= alpha);
        }
        // O_b += P·V_b: [rows, cols] × [cols, dv]
        let v_b = MatRef::row_major(&v[c0 * dv..][..cols * dv], cols, dv);
        gemm_into(out, true, MatRef::row_major(tile, rows, cols), v_b, false);
    }
    for (i, o_row) in out.chunks_mut(dv).enumerate() {
        let inv = 1.0 / sum[i];
        o_row.iter_mut().for_each(|o| *o *= inv);
        lse[i] = max[i] + sum[i].ln();
    }
}

/// `(dQ, dK, dV)` from the forward's `O` and `L` and `∂L/∂O` (`grad_out`, `[g, t_q, d_v]`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad_out: &[f32],
    dims: AttentionDims,
    params: AttentionParams,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionDims { groups, queries: tq, keys: tk, head_dim: d, value_dim: dv } = dims;
    // D_i = Σ_c dO_ic·O_ic: [g·t_q]
    let mut delta = vec![0.0f32; groups * tq];
    delta.par_chunks_mut(BLOCK_Q).enumerate().for_each(|(b, rows)| {
        for (i, dst) in rows.iter_mut().enumerate() {
            let r = b * BLOCK_Q + i;
            *dst = grad_out[r * dv..][..dv].iter().zip(&out[r * dv..][..dv]).map(|(g, o)| g * o).sum();
        }
    });
    let chunks = tk.div_ceil(KEY_CHUNK);
    let (mut dk, mut dv_out) = (vec![0.0f32; groups * tk * d], vec![0.0f32; groups * tk * dv]);
    let mut dq_parts = vec![0.0f32; groups * chunks * tq * d]; // [g, chunks, t_q, d]
    dk.par_chunks_mut(tk * d)
        .zip(dv_out.par_chunks_mut(tk * dv))
        .zip(dq_parts.par_chunks_mut(chunks * tq * d))
        .enumerate()
        .for_each(|(g, ((dk_g, dv_g), dq_g))| {
            let group = GroupSlices {
                q: &q[g * tq * d..][..tq * d],
                k: &k[g * tk * d..][..tk * d],
                v: &v[g * tk * dv..][..tk * dv],
                grad_out: &grad_out[g * tq * dv..][..tq * dv],
                lse: &lse[g * tq..][..tq],
                delta: &delta[g * tq..][..tq],
            };
            dk_g.par_chunks_mut(KEY_CHUNK * d)
                .zip(dv_g.par_chunks_mut(KEY_CHUNK * dv))
                .zip(dq_g.par_chunks_mut(tq * d))
                .enumerate()
                .for_each(|(c, ((dk_c, dv_c), dq_c))| {
                    backward_chunk(&group, c * KEY_CHUNK, (d, dv), params, dk_c, dv_c, dq_c);
                });
        });
    // dQ = Σ_chunks partial dQ, in chunk order.
    let mut dq = vec![0.0f32; groups * tq * d];
    dq.par_chunks_mut(tq * d).zip(dq_parts.par_chunks(chunks * tq * d)).for_each(|(dq_g, parts)| {
        for part in parts.chunks(tq * d) {
            dq_g.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
    });
    (dq, dk, dv_out)
}

/// One group's inputs to the backward.
struct GroupSlices<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    grad_out: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

/// The keys `k0 .. k0 + dk.len()/d` of one group: their `dK`, `dV`, and this chunk's share of
/// `dQ` (`dq [t_q, d]`).
fn backward_chunk(
    g: &GroupSlices<'_>,
    k0: usize,
    (d, dv): (usize, usize),
    params: AttentionParams,
    dk: &mut [f32],
    dv_out: &mut [f32],
    dq: &mut [f32],
) {
    let (tq, chunk_keys) = (g.lse.len(), dk.len() / d);
    let mut p = vec![0.0f32; BLOCK_Q * BLOCK_K]; // [rows, cols]
    let mut ds = vec![0.0f32; BLOCK_Q * BLOCK_K]; // [rows, cols]
    for c0 in (k0..k0 + chunk_keys).step_by(BLOCK_K) {
        let cols = BLOCK_K.min(k0 + chunk_keys - c0);
        let (k_b, v_b) = (&g.k[c0 * d..][..cols * d], &g.v[c0 * dv..][..cols * dv]);
        let (dk_b, dv_b) = (&mut dk[(c0 - k0) * d..][..cols * d], &mut dv_out[(c0 - k0) * dv..][..cols * dv]);
        // Causal: the rows before c0 see none of these keys.
        let first_row = if params.causal { c0 } else { 0 };
        for r0 in (first_row / BLOCK_Q * BLOCK_Q..tq).step_by(BLOCK_Q) {
            let rows = BLOCK_Q.min(tq - r0);
            let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
            let q_b = MatRef::row_major(&g.q[r0 * d..][..rows * d], rows, d);
            let go_b = MatRef::row_major(&g.grad_out[r0 * dv..][..rows * dv], rows, dv);
            // P = exp(s·Q_b·K_bᵀ − L): [rows, cols]
            gemm_into(p, false, q_b, MatRef::transposed(k_b, d, cols), false);
            // dP = dO_b·V_bᵀ: [rows, cols]
            gemm_into(ds, false, go_b, MatRef::transposed(v_b, dv, cols), false);
            for i in 0..rows {
                let last = last_visible(r0 + i, c0, cols, params.causal);
                let (l, delta) = (g.lse[r0 + i], g.delta[r0 + i]);
                let (p_row, ds_row) = (&mut p[i * cols..][..cols], &mut ds[i * cols..][..cols]);
                for (pj, dsj) in p_row[..last].iter_mut().zip(&mut ds_row[..last]) {
                    *pj = (*pj * params.scale - l).exp();
                    // dS = P ⊙ (dP − D), times s for dQ and dK.
                    *dsj = *pj * (*dsj - delta) * params.scale;
                }
                p_row[last..].fill(0.0);
                ds_row[last..].fill(0.0);
            }
            // dV_b += Pᵀ·dO_b: [cols, rows] × [rows, dv]
            gemm_into(dv_b, true, MatRef::transposed(p, cols, rows), go_b, false);
            // dK_b += dSᵀ·Q_b: [cols, rows] × [rows, d]
            gemm_into(dk_b, true, MatRef::transposed(ds, cols, rows), q_b, false);
            // dQ_b += dS·K_b: [rows, cols] × [cols, d]
            let dq_b = &mut dq[r0 * d..][..rows * d];
            gemm_into(dq_b, true, MatRef::row_major(ds, rows, cols), MatRef::row_major(k_b, cols, d), false);
        }
    }
}

/// The keys a block ending before row `end` can see: all, or (causal) `0 .. end`.
fn visible_keys(keys: usize, end: usize, causal: bool) -> usize {
    if causal { keys.min(end) } else { keys }
}

/// How many of the tile's `cols` keys from `c0` row `row` sees (causal: keys `≤ row`).
fn last_visible(row: usize, c0: usize, cols: usize, causal: bool) -> usize {
    if causal { (row + 1).saturating_sub(c0).min(cols) } else { cols }
}
