//! Fused attention, forward and backward, in the manner of FlashAttention: tiles of `TILE`
//! queries × `TILE` keys in shared memory, an online softmax, the per-row log-sum-exp kept
//! for the backward, which recomputes the probabilities tile by tile. No kernel ever holds
//! a `[queries, keys]` matrix; every one reads its storage type `F` and computes in `f32`.
//!
//! A cube is `TILE × TILE` units. In the score phase unit `(x, y)` computes the score of
//! query `r0 + y` and key `c0 + x`; in the accumulation phase it owns one output row (query
//! or key) and the columns `x, x + TILE, …` of it, in a local array.
//!
//! - [`attention_forward`]: cube per (query tile, group); streams the key tiles.
//! - [`attention_delta`]: `D_i = Σ_c dO_ic·O_ic`, one unit per row.
//! - [`attention_backward_kv`]: cube per (key tile, group); streams the query tiles and
//!   accumulates `dV = Pᵀ·dO` and `dK = s·dSᵀ·Q` for its keys.
//! - [`attention_backward_q`]: cube per (query tile, group); streams the key tiles and
//!   accumulates `dQ = s·dS·K`. `dQ` gets its own pass (the scores are recomputed) so that no
//!   output is written by two cubes: no atomics, results independent of scheduling.
//!
//! Masked scores use a large finite negative number, not `−∞` (WGSL has no infinities).
//! These kernels run on the SIMT units; tensor-core (MMA) versions are future work.

use cubecl::prelude::*;

/// Queries and keys per tile; a cube is `TILE × TILE` units.
pub const TILE: u32 = 16;

/// `f32` elements of shared memory the kernels take for a row width of `width` (the larger
/// of the head dim and the value dim): four `TILE × TILE` tiles and one `TILE × width` tile.
pub const fn shared_floats(width: usize) -> usize {
    let t = TILE as usize;
    4 * t * t + t * width
}

/// `Σ_c a[r0 + y, c]·b[c0 + x, c]` over `width` columns for unit `(x, y)`, where `a` is the
/// `[a_rows, width]` matrix at `a_base` and `b` the `[b_rows, width]` one at `b_base`; rows
/// past the end read as zero. Staged through the shared tiles `sa`, `sb` `TILE` columns at a
/// time (every unit of the cube must call it).
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_dot<F: Float>(
    a: &Array<F>,
    a_base: usize,
    a_rows: usize,
    r0: usize,
    b: &Array<F>,
    b_base: usize,
    b_rows: usize,
    c0: usize,
    width: usize,
    sa: &mut SharedMemory<f32>,
    sb: &mut SharedMemory<f32>,
    #[comptime] tile: u32,
) -> f32 {
    let t = tile as usize;
    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let mut acc = 0.0f32;
    let steps = width.div_ceil(t);
    for s in 0..steps {
        let c = s * t + x;
        let mut va = 0.0f32;
        if r0 + y < a_rows && c < width {
            va = f32::cast_from(a[a_base + (r0 + y) * width + c]);
        }
        sa[y * t + x] = va;
        let mut vb = 0.0f32;
        if c0 + y < b_rows && c < width {
            vb = f32::cast_from(b[b_base + (c0 + y) * width + c]);
        }
        sb[y * t + x] = vb;
        sync_cube();
        for p in 0..t {
            acc += sa[y * t + p] * sb[x * t + p];
        }
        sync_cube();
    }
    acc
}

/// Copies rows `r0 .. r0 + TILE` of the `[rows, width]` matrix at `base` into
/// `dst [TILE, width]`, zeros past the end (every unit of the cube calls it; the caller syncs).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    src: &Array<F>,
    base: usize,
    rows: usize,
    r0: usize,
    width: usize,
    dst: &mut SharedMemory<f32>,
    #[comptime] tile: u32,
) {
    let t = tile as usize;
    let n = t * width;
    let mut e = UNIT_POS_Y as usize * t + UNIT_POS_X as usize;
    while e < n {
        let r = e / width;
        let mut v = 0.0f32;
        if r0 + r < rows {
            v = f32::cast_from(src[base + (r0 + r) * width + e % width]);
        }
        dst[e] = v;
        e += t * t;
    }
}

/// Whether query `row` sees key `col`: both in range, and `col ≤ row` when `causal`.
#[cube]
fn visible(row: usize, col: usize, queries: usize, keys: usize, causal: u32) -> bool {
    row < queries && col < keys && (causal == 0 || col <= row)
}

/// `out [g, t_q, d_v] = softmax(s·Q·Kᵀ + M)·V`, `lse [g, t_q] = ln Σ_j e^{s·q·k_j}`.
/// Cube `(query tile, group)`; `value_cols = ⌈d_v / TILE⌉`, `width ≥ d_v`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    out: &mut Array<F>,
    lse: &mut Array<f32>,
    queries: u32,
    keys: u32,
    head_dim: u32,
    value_dim: u32,
    scale: f32,
    causal: u32,
    #[comptime] tile: u32,
    #[comptime] value_cols: u32,
    #[comptime] width: u32,
) {
    let t = tile as usize;
    let (tq, tk, d, dv) = (queries as usize, keys as usize, head_dim as usize, value_dim as usize);
    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let g = CUBE_POS_Y as usize;
    let r0 = CUBE_POS_X as usize * t;
    let row = r0 + y;
    let mut sa = SharedMemory::<f32>::new(t * t);
    let mut sb = SharedMemory::<f32>::new(t * t);
    let mut sp = SharedMemory::<f32>::new(t * t); // [rows, keys]: scores, then probabilities
    let mut sv = SharedMemory::<f32>::new(t * width as usize); // [keys, d_v]
    let mut acc = Array::<f32>::new(value_cols as usize); // columns x, x + t, … of the row
    for cc in 0..value_cols as usize {
        acc[cc] = 0.0;
    }
    let mut m = f32::new(-1.0e30); // running row max (finite: WGSL has no −∞)
    let mut l = 0.0f32; // running row sum of e^{s − m}
    let mut key_end = tk;
    if causal == 1 && r0 + t < tk {
        key_end = r0 + t;
    }
    let tiles = key_end.div_ceil(t);
    for kt in 0..tiles {
        let c0 = kt * t;
        // S = s·Q_b·K_bᵀ: [t, t]
        let s = tile_dot::<F>(q, g * tq * d, tq, r0, k, g * tk * d, tk, c0, d, &mut sa, &mut sb, tile) * scale;
        // Rows past t_q see nothing and are never written.
        let seen = visible(row, c0 + x, tq, tk, causal);
        let mut score = f32::new(-1.0e30);
        if seen {
            score = s;
        }
        sp[y * t + x] = score;
        stage_rows::<F>(v, g * tk * dv, tk, c0, dv, &mut sv, tile);
        sync_cube();
        let mut tile_max = f32::new(-1.0e30);
        for j in 0..t {
            tile_max = f32::max(tile_max, sp[y * t + j]);
        }
        let m_new = f32::max(m, tile_max);
        let alpha = f32::exp(m - m_new);
        sync_cube();
        let mut p = 0.0f32;
        if seen {
            p = f32::exp(score - m_new);
        }
        sp[y * t + x] = p;
        sync_cube();
        let mut row_sum = 0.0f32;
        for j in 0..t {
            row_sum += sp[y * t + j];
        }
        l = l * alpha + row_sum;
        m = m_new;
        // O_b = α·O_b + P·V_b for this unit's columns.
        for cc in 0..value_cols as usize {
            let c = cc * t + x;
            let mut o = acc[cc] * alpha;
            if c < dv {
                for j in 0..t {
                    o += sp[y * t + j] * sv[j * dv + c];
                }
            }
            acc[cc] = o;
        }
        sync_cube();
    }
    if row < tq {
        let inv = 1.0f32 / l;
        for cc in 0..value_cols as usize {
            let c = cc * t + x;
            if c < dv {
                out[(g * tq + row) * dv + c] = F::cast_from(acc[cc] * inv);
            }
        }
        if x == 0 {
            lse[g * tq + row] = m + f32::ln(l);
        }
    }
}

/// `delta[r] = Σ_c dO[r, c]·O[r, c]` over rows of `value_dim`, one unit per row.
#[cube(launch)]
pub fn attention_delta<F: Float>(out: &Array<F>, grad_out: &Array<F>, delta: &mut Array<f32>, value_dim: u32) {
    if ABSOLUTE_POS < delta.len() {
        let dv = value_dim as usize;
        let base = ABSOLUTE_POS * dv;
        let mut acc = 0.0f32;
        for c in 0..dv {
            acc += f32::cast_from(grad_out[base + c]) * f32::cast_from(out[base + c]);
        }
        delta[ABSOLUTE_POS] = acc;
    }
}

/// `dK = s·dSᵀ·Q` and `dV = Pᵀ·dO` for one key tile (cube `(key tile, group)`), with
/// `P = e^{s·QKᵀ − L}` and `dS = P ⊙ (dO·Vᵀ − D)` recomputed per query tile;
/// `key_cols = ⌈d / TILE⌉`, `value_cols = ⌈d_v / TILE⌉`, `width ≥ max(d, d_v)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_kv<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    grad_out: &Array<F>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dk: &mut Array<F>,
    dv_out: &mut Array<F>,
    queries: u32,
    keys: u32,
    head_dim: u32,
    value_dim: u32,
    scale: f32,
    causal: u32,
    #[comptime] tile: u32,
    #[comptime] key_cols: u32,
    #[comptime] value_cols: u32,
    #[comptime] width: u32,
) {
    let t = tile as usize;
    let (tq, tk, d, dv) = (queries as usize, keys as usize, head_dim as usize, value_dim as usize);
    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let g = CUBE_POS_Y as usize;
    let c0 = CUBE_POS_X as usize * t;
    let mut sa = SharedMemory::<f32>::new(t * t);
    let mut sb = SharedMemory::<f32>::new(t * t);
    let mut sp = SharedMemory::<f32>::new(t * t); // [queries, keys]: P
    let mut sds = SharedMemory::<f32>::new(t * t); // [queries, keys]: s·dS
    let mut srow = SharedMemory::<f32>::new(t * width as usize); // [queries, d_v], then [queries, d]
    let mut acc_k = Array::<f32>::new(key_cols as usize);
    let mut acc_v = Array::<f32>::new(value_cols as usize);
    for cc in 0..key_cols as usize {
        acc_k[cc] = 0.0;
    }
    for cc in 0..value_cols as usize {
        acc_v[cc] = 0.0;
    }
    // Causal: the query tiles before this key tile see none of its keys.
    let mut first = 0usize;
    if causal == 1 {
        first = c0 / t;
    }
    let tiles = tq.div_ceil(t);
    for rt in first..tiles {
        let r0 = rt * t;
        let row = r0 + y;
        let s = tile_dot::<F>(q, g * tq * d, tq, r0, k, g * tk * d, tk, c0, d, &mut sa, &mut sb, tile) * scale;
        let dp = tile_dot::<F>(grad_out, g * tq * dv, tq, r0, v, g * tk * dv, tk, c0, dv, &mut sa, &mut sb, tile);
        let mut p = 0.0f32;
        let mut ds = 0.0f32;
        if visible(row, c0 + x, tq, tk, causal) {
            p = f32::exp(s - lse[g * tq + row]);
            ds = p * (dp - delta[g * tq + row]) * scale;
        }
        sp[y * t + x] = p;
        sds[y * t + x] = ds;
        stage_rows::<F>(grad_out, g * tq * dv, tq, r0, dv, &mut srow, tile);
        sync_cube();
        // dV[c0 + y, c] += Σ_i P[i, y]·dO[i, c]
        for cc in 0..value_cols as usize {
            let c = cc * t + x;
            if c < dv {
                let mut a = acc_v[cc];
                for i in 0..t {
                    a += sp[i * t + y] * srow[i * dv + c];
                }
                acc_v[cc] = a;
            }
        }
        sync_cube();
        stage_rows::<F>(q, g * tq * d, tq, r0, d, &mut srow, tile);
        sync_cube();
        // dK[c0 + y, c] += Σ_i s·dS[i, y]·Q[i, c]
        for cc in 0..key_cols as usize {
            let c = cc * t + x;
            if c < d {
                let mut a = acc_k[cc];
                for i in 0..t {
                    a += sds[i * t + y] * srow[i * d + c];
                }
                acc_k[cc] = a;
            }
        }
        sync_cube();
    }
    let key = c0 + y;
    if key < tk {
        for cc in 0..key_cols as usize {
            let c = cc * t + x;
            if c < d {
                dk[(g * tk + key) * d + c] = F::cast_from(acc_k[cc]);
            }
        }
        for cc in 0..value_cols as usize {
            let c = cc * t + x;
            if c < dv {
                dv_out[(g * tk + key) * dv + c] = F::cast_from(acc_v[cc]);
            }
        }
    }
}

/// `dQ = s·dS·K` for one query tile (cube `(query tile, group)`), `dS` recomputed per key
/// tile as in [`attention_backward_kv`]; `key_cols = ⌈d / TILE⌉`, `width ≥ d`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_q<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    grad_out: &Array<F>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dq: &mut Array<F>,
    queries: u32,
    keys: u32,
    head_dim: u32,
    value_dim: u32,
    scale: f32,
    causal: u32,
    #[comptime] tile: u32,
    #[comptime] key_cols: u32,
    #[comptime] width: u32,
) {
    let t = tile as usize;
    let (tq, tk, d, dv) = (queries as usize, keys as usize, head_dim as usize, value_dim as usize);
    let x = UNIT_POS_X as usize;
    let y = UNIT_POS_Y as usize;
    let g = CUBE_POS_Y as usize;
    let r0 = CUBE_POS_X as usize * t;
    let row = r0 + y;
    let mut sa = SharedMemory::<f32>::new(t * t);
    let mut sb = SharedMemory::<f32>::new(t * t);
    let mut sds = SharedMemory::<f32>::new(t * t); // [queries, keys]: s·dS
    let mut srow = SharedMemory::<f32>::new(t * width as usize); // [keys, d]
    let mut acc = Array::<f32>::new(key_cols as usize);
    for cc in 0..key_cols as usize {
        acc[cc] = 0.0;
    }
    let mut key_end = tk;
    if causal == 1 && r0 + t < tk {
        key_end = r0 + t;
    }
    let tiles = key_end.div_ceil(t);
    for kt in 0..tiles {
        let c0 = kt * t;
        let s = tile_dot::<F>(q, g * tq * d, tq, r0, k, g * tk * d, tk, c0, d, &mut sa, &mut sb, tile) * scale;
        let dp = tile_dot::<F>(grad_out, g * tq * dv, tq, r0, v, g * tk * dv, tk, c0, dv, &mut sa, &mut sb, tile);
        let mut ds = 0.0f32;
        if visible(row, c0 + x, tq, tk, causal) {
            let p = f32::exp(s - lse[g * tq + row]);
            ds = p * (dp - delta[g * tq + row]) * scale;
        }
        sds[y * t + x] = ds;
        stage_rows::<F>(k, g * tk * d, tk, c0, d, &mut srow, tile);
        sync_cube();
        // dQ[row, c] += Σ_j s·dS[y, j]·K[c0 + j, c]
        for cc in 0..key_cols as usize {
            let c = cc * t + x;
            if c < d {
                let mut a = acc[cc];
                for j in 0..t {
                    a += sds[y * t + j] * srow[j * d + c];
                }
                acc[cc] = a;
            }
        }
        sync_cube();
    }
    if row < tq {
        for cc in 0..key_cols as usize {
            let c = cc * t + x;
            if c < d {
                dq[(g * tq + row) * d + c] = F::cast_from(acc[cc]);
            }
        }
    }
}
