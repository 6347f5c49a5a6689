//! Nearest upsampling (and its backward) and channel concat/slice, NCHW.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::uninit::written_once;

/// `[planes, h, w] → [planes, f·h, f·w]`, parallel over planes.
pub(crate) fn upsample_nearest(x: &[f32], h: usize, w: usize, f: usize) -> Vec<f32> {
    let (oh, ow) = (h * f, w * f);
    let planes = x.len() / (h * w).max(1);
    let mut out = vec![0.0f32; planes * oh * ow];
    out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(o, src)| {
        for i in 0..oh {
            let src_row = &src[(i / f) * w..(i / f + 1) * w];
            for (j, v) in o[i * ow..(i + 1) * ow].iter_mut().enumerate() {
                *v = src_row[j / f];
            }
        }
    });
    out
}

/// Sums each `f × f` block: `[planes, f·h, f·w] → [planes, h, w]`.
pub(crate) fn upsample_nearest_backward(g: &[f32], oh: usize, ow: usize, f: usize) -> Vec<f32> {
    let (h, w) = (oh / f, ow / f);
    let planes = g.len() / (oh * ow).max(1);
    let mut out = vec![0.0f32; planes * h * w];
    out.par_chunks_mut(h * w).zip(g.par_chunks(oh * ow)).for_each(|(o, src)| {
        for i in 0..oh {
            let dst = &mut o[(i / f) * w..(i / f + 1) * w];
            for (j, &v) in src[i * ow..(i + 1) * ow].iter().enumerate() {
                dst[j / f] += v;
            }
        }
    });
    out
}

/// Concatenates per-sample blocks: part `k` contributes `per_sample[k]` values per sample.
pub(crate) fn concat_channels(parts: &[&[f32]], per_sample: &[usize], batch: usize) -> Vec<f32> {
    assert_eq!(parts.len(), per_sample.len(), "concat_channels: one length per part");
    let total: usize = per_sample.iter().sum();
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(total.max(1)).enumerate().for_each(|(n, o)| {
            let mut at = 0;
            for (part, &len) in parts.iter().zip(per_sample) {
                for (d, &v) in o[at..at + len].iter_mut().zip(&part[n * len..(n + 1) * len]) {
                    d.write(v);
                }
                at += len;
            }
        })
    };
    // SAFETY: each sample's block of `total` values is written part after part, and the
    // parts' lengths sum to `total` (one length per part, asserted).
    unsafe { written_once(batch * total, write) }.0
}

/// Row-major copy of a permuted view: output dim `k` has size `dims[k]` and stride
/// `strides[k]` in `x`. Parallel over output rows (the last dim); each row is one strided
/// gather.
pub(crate) fn permute(x: &[f32], dims: &[usize], strides: &[usize]) -> Vec<f32> {
    let r = dims.len();
    let row = dims.last().copied().unwrap_or(1).max(1);
    let inner_stride = strides.last().copied().unwrap_or(1);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(row).enumerate().for_each(|(i, o)| {
        // Source offset of row `i`: decode its index over the outer dims.
        let (mut rem, mut base) = (i, 0usize);
        for d in (0..r.saturating_sub(1)).rev() {
            base += (rem % dims[d]) * strides[d];
            rem /= dims[d];
        }
        for (j, v) in o.iter_mut().enumerate() {
            *v = x[base + j * inner_stride];
        }
    });
    out
}
