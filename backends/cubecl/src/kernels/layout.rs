//! Nearest upsampling and channel concat/slice over NCHW (one thread per output element).

use cubecl::prelude::*;

/// `out[b, c, i, j] = x[b, c, i / f, j / f]`; `out` is `[.., h·f, w·f]`.
#[cube(launch)]
pub fn upsample_nearest<F: Float>(x: &Array<F>, out: &mut Array<F>, h: u32, w: u32, factor: u32) {
    if ABSOLUTE_POS < out.len() {
        let f = factor as usize;
        let ow = w as usize * f;
        let oh = h as usize * f;
        let j = ABSOLUTE_POS % ow;
        let i = (ABSOLUTE_POS / ow) % oh;
        let plane = ABSOLUTE_POS / (ow * oh);
        out[ABSOLUTE_POS] = x[(plane * h as usize + i / f) * w as usize + j / f];
    }
}

/// `dx[b, c, i, j] = Σ_{u,v < f} g[b, c, i·f + u, j·f + v]`; `dx` is `[.., h, w]`.
#[cube(launch)]
pub fn upsample_nearest_backward<F: Float>(g: &Array<F>, dx: &mut Array<F>, h: u32, w: u32, factor: u32) {
    if ABSOLUTE_POS < dx.len() {
        let f = factor as usize;
        let ww = w as usize;
        let hh = h as usize;
        let j = ABSOLUTE_POS % ww;
        let i = (ABSOLUTE_POS / ww) % hh;
        let plane = ABSOLUTE_POS / (ww * hh);
        let ow = ww * f;
        let mut acc = 0.0f32;
        for u in 0..f {
            for v in 0..f {
                acc += f32::cast_from(g[(plane * hh * f + i * f + u) * ow + j * f + v]);
            }
        }
        dx[ABSOLUTE_POS] = F::cast_from(acc);
    }
}

/// Copies channel block `[b, c_src_start .. c_src_start + len, ..]` of `src` (`src_c`
/// channels) to channels `dst_start ..` of `dst` (`dst_c` channels); `inner` = h·w.
/// One thread per copied element.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn copy_channels<F: Float>(
    src: &Array<F>,
    dst: &mut Array<F>,
    batch: u32,
    len: u32,
    inner: u32,
    src_c: u32,
    src_start: u32,
    dst_c: u32,
    dst_start: u32,
) {
    let per = len as usize * inner as usize;
    if ABSOLUTE_POS < batch as usize * per {
        let b = ABSOLUTE_POS / per;
        let r = ABSOLUTE_POS % per;
        let from = (b * src_c as usize + src_start as usize) * inner as usize + r;
        let to = (b * dst_c as usize + dst_start as usize) * inner as usize + r;
        dst[to] = src[from];
    }
}

/// `out[i] = x[Σ_k coord_k(i)·stride_k]` over the output's row-major coordinates; `meta`
/// holds the output dims, then each output dim's stride in `x`.
#[cube(launch)]
pub fn permute<F: Float>(x: &Array<F>, out: &mut Array<F>, meta: &Array<u32>, rank: u32) {
    if ABSOLUTE_POS < out.len() {
        let r = rank as usize;
        let mut rem = ABSOLUTE_POS;
        let mut src = 0usize;
        for k in 0..r {
            let d = r - 1 - k;
            let size = meta[d] as usize;
            src += (rem % size) * meta[r + d] as usize;
            rem /= size;
        }
        out[ABSOLUTE_POS] = x[src];
    }
}
