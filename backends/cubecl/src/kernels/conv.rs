//! conv2d as im2col + matmul. The column matrix is `[c·kh·kw, n·oh·ow]`: the batch is
//! folded into the columns, so forward and both backwards are single matmuls.

use cubecl::prelude::*;

/// Geometry in `meta`: `[n, c, h, w, kh, kw, oh, ow, stride_h, stride_w, pad_h, pad_w]`.
#[cube]
fn g(meta: &Array<u32>, i: usize) -> usize {
    meta[i] as usize
}

/// `col[(ci·kh + u)·kw + v, (b·oh + i)·ow + j] = x[b, ci, i·sh + u − ph, j·sw + v − pw]`
/// (0 outside the image). One thread per element of `col`. With `per_image`, the layout is
/// `[n, c·kh·kw, oh·ow]` instead: one column matrix per image (the weight gradient's split of
/// its long reduction over images).
#[cube(launch)]
pub fn im2col<F: Float>(x: &Array<F>, col: &mut Array<F>, meta: &Array<u32>, #[comptime] per_image: bool) {
    if ABSOLUTE_POS < col.len() {
        let n = g(meta, 0);
        let c = g(meta, 1);
        let h = g(meta, 2);
        let w = g(meta, 3);
        let kh = g(meta, 4);
        let kw = g(meta, 5);
        let oh = g(meta, 6);
        let ow = g(meta, 7);
        let sh = g(meta, 8);
        let sw = g(meta, 9);
        let ph = g(meta, 10);
        let pw = g(meta, 11);
        let p = oh * ow;
        let q = ABSOLUTE_POS % p;
        // `t = r·n + b` (columns `[rows, n·p]`) or `b·rows + r` (per image `[n, rows, p]`).
        let t = ABSOLUTE_POS / p;
        let mut r = t / n;
        let mut b = t % n;
        if comptime![per_image] {
            let rows = c * kh * kw;
            r = t % rows;
            b = t / rows;
        }
        let ci = r / (kh * kw);
        let u = (r / kw) % kh;
        let v = r % kw;
        let i = q / ow;
        let j = q % ow;
        // Unsigned: `ih + ph` is the padded row, in range when ≥ ph and < h + ph.
        let ihp = i * sh + u;
        let iwp = j * sw + v;
        let mut val = F::new(0.0);
        if ihp >= ph && ihp < h + ph && iwp >= pw && iwp < w + pw {
            val = x[((b * c + ci) * h + (ihp - ph)) * w + (iwp - pw)];
        }
        col[ABSOLUTE_POS] = val;
    }
}

// `is_multiple_of` has no kernel translation; `%` has.
#[allow(clippy::manual_is_multiple_of)]
/// The adjoint of [`im2col`] as a gather (no atomics, deterministic): one thread per input
/// element sums the `col` entries that read it.
#[cube(launch)]
pub fn col2im<F: Float>(col: &Array<F>, x: &mut Array<F>, meta: &Array<u32>) {
    if ABSOLUTE_POS < x.len() {
        let n = g(meta, 0);
        let c = g(meta, 1);
        let h = g(meta, 2);
        let w = g(meta, 3);
        let kh = g(meta, 4);
        let kw = g(meta, 5);
        let oh = g(meta, 6);
        let ow = g(meta, 7);
        let sh = g(meta, 8);
        let sw = g(meta, 9);
        let ph = g(meta, 10);
        let pw = g(meta, 11);
        let cols = n * oh * ow;
        let iw = ABSOLUTE_POS % w;
        let ih = (ABSOLUTE_POS / w) % h;
        let ci = (ABSOLUTE_POS / (w * h)) % c;
        let b = ABSOLUTE_POS / (w * h * c);
        let mut acc = 0.0f32;
        for u in 0..kh {
            // i·sh = ih + ph − u must be a non-negative multiple of sh below oh·sh.
            let top = ih + ph;
            if top >= u && (top - u) % sh == 0 && (top - u) / sh < oh {
                let i = (top - u) / sh;
                for v in 0..kw {
                    let left = iw + pw;
                    if left >= v && (left - v) % sw == 0 && (left - v) / sw < ow {
                        let j = (left - v) / sw;
                        let r = (ci * kh + u) * kw + v;
                        acc += f32::cast_from(col[r * cols + (b * oh + i) * ow + j]);
                    }
                }
            }
        }
        x[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

/// `[c, n, p] → [n, c, p]` (+ `bias[c]` when `has_bias`): the matmul output to NCHW.
#[cube(launch)]
pub fn cnp_to_ncp<F: Float>(
    src: &Array<F>,
    bias: &Array<F>,
    out: &mut Array<F>,
    n: u32,
    c: u32,
    p: u32,
    #[comptime] has_bias: bool,
) {
    if ABSOLUTE_POS < out.len() {
        let nn = n as usize;
        let cc = c as usize;
        let pp = p as usize;
        let s = ABSOLUTE_POS % pp;
        let ci = (ABSOLUTE_POS / pp) % cc;
        let b = ABSOLUTE_POS / (pp * cc);
        let mut v = f32::cast_from(src[(ci * nn + b) * pp + s]);
        if comptime![has_bias] {
            v += f32::cast_from(bias[ci]);
        }
        out[ABSOLUTE_POS] = F::cast_from(v);
    }
}

/// `[n, c, p] → [c, n, p]`: an NCHW gradient to the matmul layout.
#[cube(launch)]
pub fn ncp_to_cnp<F: Float>(src: &Array<F>, out: &mut Array<F>, n: u32, c: u32, p: u32) {
    if ABSOLUTE_POS < out.len() {
        let nn = n as usize;
        let cc = c as usize;
        let pp = p as usize;
        let s = ABSOLUTE_POS % pp;
        let b = (ABSOLUTE_POS / pp) % nn;
        let ci = ABSOLUTE_POS / (pp * nn);
        out[ABSOLUTE_POS] = src[(b * cc + ci) * pp + s];
    }
}
