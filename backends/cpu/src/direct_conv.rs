//! Direct stride-1 convolution with AVX-512: no im2col buffer, no GEMM packing.
//!
//! `y[n, co, i, j] = b[co] + Σ_{ci, u, v} W[co, ci, u, v] · x̃[n, ci, i + u, j + v]`, where `x̃` is
//! `x` with its zero padding written out (one copy of the input, against im2col's `kh·kw`).
//! The output rows are cut into slots of up to 16 pixels (one vector each) and the output
//! channels into blocks of up to [`CHANNELS`]; one tile takes [`SLOTS`] slots, keeps
//! `CHANNELS × SLOTS` accumulators (24 registers) and, per `(ci, u, v)`, loads each slot's input
//! vector once and multiplies it by a broadcast weight of every channel of the block. The
//! weights are packed per block as `[ci, u, v, channel]`, so each step's broadcasts are
//! consecutive floats. Tiles run in parallel over `(image, channel block)` pairs; each output
//! element is summed by one tile in a fixed order, so results do not depend on the thread
//! count.
//!
//! Why by hand: the `gemm` crate multiplies explicit matrices, so a convolution through it pays
//! for lowering the input (im2col, `kh·kw` copies of it) and for packing that lowered matrix
//! again; at the toy's sizes (8–64 channels, 8–32 pixels a side) those copies cost as much as
//! the arithmetic. No maintained crate offers a direct CPU convolution for `f32` NCHW.

use std::sync::atomic::{AtomicU8, Ordering};

use lisa_core::backend::geometry::Conv2dGeometry;
use rayon::prelude::*;

/// Output channels per tile (each an accumulator per pixel vector).
const CHANNELS: usize = 8;
/// Reduction length `c_in·kh·kw` up to which the direct kernel is used: beyond it (SD's wide
/// layers) a block's weights outgrow the L1 cache and the GEMM path is the better choice.
const MAX_REDUCTION: usize = 128 * 9;

/// Output rows narrower than this run on the GEMM path: a slot holds one row's pixels, so
/// narrow rows leave most of its 16 lanes idle (at 8×8 the direct kernel was 1.7× slower).
const MIN_WIDTH: usize = 12;

/// Off (1) or on (2) by [`set_direct_conv`]; 0: not set, `LISA_CPU_DIRECT_CONV=1` decides.
static SWITCH: AtomicU8 = AtomicU8::new(0);

/// Turns the direct convolution on or off for this process (default: off unless the
/// environment sets `LISA_CPU_DIRECT_CONV=1`). It is opt-in because, although it is 10–20 %
/// faster than im2col + GEMM on the toy's convolutions measured alone, the training steps
/// measured no faster with it and sampling 64 images measured ≈ 9 % slower (lisa-cpu README).
pub fn set_direct_conv(on: bool) {
    SWITCH.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether this CPU can run the direct convolution (AVX-512F).
pub fn direct_conv_available() -> bool {
    has_avx512()
}

fn switched_on() -> bool {
    match SWITCH.load(Ordering::Relaxed) {
        0 => {
            static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *FROM_ENV.get_or_init(|| std::env::var("LISA_CPU_DIRECT_CONV").is_ok_and(|v| v == "1"))
        }
        v => v == 2,
    }
}

/// Whether [`conv2d`] handles `g`: switched on ([`set_direct_conv`]), stride 1, not a plain 1×1
/// product (that one needs no im2col), rows of at least [`MIN_WIDTH`] pixels, a reduction of at
/// most [`MAX_REDUCTION`], and AVX-512F at run time.
pub(crate) fn applies(g: &Conv2dGeometry) -> bool {
    let pointwise = g.kh == 1 && g.kw == 1 && g.params.padding == [0, 0];
    switched_on()
        && g.params.stride == [1, 1]
        && !pointwise
        && g.ow >= MIN_WIDTH
        && g.c_in * g.kh * g.kw <= MAX_REDUCTION
        && has_avx512()
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// Forward: `y = W ⋆ x + b` for a geometry [`applies`] accepted; `x [n, c_in, h, w]`,
/// `w [c_out, c_in, kh, kw]`.
pub(crate) fn conv2d(g: &Conv2dGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    assert!(applies(g), "direct_conv::conv2d called for a geometry it does not handle");
    let [ph, pw] = g.params.padding;
    let (hp, wp) = (g.h + 2 * ph, g.w + 2 * pw);
    // The padded input, plus one vector of slack so that a tile's last (masked) load never
    // reads past the buffer: [n, c_in, hp, wp].
    let plane = hp * wp;
    let mut padded = vec![0.0f32; g.batch * g.c_in * plane + 16];
    padded[..g.batch * g.c_in * plane].par_chunks_mut(plane).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
        for (r, row) in src.chunks(g.w).enumerate() {
            dst[(r + ph) * wp + pw..][..g.w].copy_from_slice(row);
        }
    });
    // Channel blocks: (first channel, width), widths CHANNELS, then 4, 2, 1 for the rest.
    let mut blocks = Vec::new();
    let mut co = 0;
    for width in [CHANNELS, 4, 2, 1] {
        while g.c_out - co >= width {
            blocks.push((co, width));
            co += width;
        }
    }
    // Weights per block: [ci, u, v, channel].
    let taps = g.c_in * g.kh * g.kw;
    let mut packed = vec![0.0f32; g.c_out * taps];
    for &(c0, width) in &blocks {
        let dst = &mut packed[c0 * taps..(c0 + width) * taps];
        for t in 0..taps {
            for c in 0..width {
                dst[t * width + c] = w[(c0 + c) * taps + t];
            }
        }
    }
    let p = g.oh * g.ow;
    let mut y = vec![0.0f32; g.batch * g.c_out * p];
    // One task per (image, channel block): its output rows are contiguous.
    let mut tasks: Vec<(usize, usize, usize, &mut [f32])> = Vec::with_capacity(g.batch * blocks.len());
    for (n, mut rest) in y.chunks_mut(g.c_out * p).enumerate() {
        for &(c0, width) in &blocks {
            let (mine, tail) = rest.split_at_mut(width * p);
            tasks.push((n, c0, width, mine));
            rest = tail;
        }
    }
    let padded = &padded;
    let packed = &packed;
    tasks.into_par_iter().for_each(|(n, c0, width, out)| {
        let input = &padded[n * g.c_in * plane..];
        let weights = &packed[c0 * taps..(c0 + width) * taps];
        let bias = bias.map(|b| &b[c0..c0 + width]);
        // SAFETY: `applies` checked AVX-512F at run time; the slices' bounds are checked inside.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match width {
                CHANNELS => block::<CHANNELS>(g, input, weights, bias, out),
                4 => block::<4>(g, input, weights, bias, out),
                2 => block::<2>(g, input, weights, bias, out),
                _ => block::<1>(g, input, weights, bias, out),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (input, weights, bias, out);
    });
    y
}

/// One (image, block of `R` channels): the output's rows cut into slots of up to 16 pixels
/// (a row's pixels `j0 .. j0 + lanes`), taken [`SLOTS`] at a time, in order, across row ends.
/// `input` starts at the image's padded `[c_in, hp, wp]` planes (with at least 16 floats after
/// them), `weights` is the block's `[ci, u, v, R]`, `out` its `[R, oh, ow]`.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block<const R: usize>(
    g: &Conv2dGeometry,
    input: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let [ph, pw] = g.params.padding;
    let plane = (g.h + 2 * ph) * (g.w + 2 * pw);
    // Every input read lies in the image's planes plus the 16 floats of slack; every write in
    // `out` (see `tile`).
    assert!(input.len() >= g.c_in * plane + 16);
    assert!(weights.len() == g.c_in * g.kh * g.kw * R && out.len() == R * g.oh * g.ow);
    let bias: [f32; R] = std::array::from_fn(|c| bias.map_or(0.0, |b| b[c]));
    let mut slots =
        (0..g.oh).flat_map(|i| (0..g.ow).step_by(16).map(move |j0| Slot { i, j0, lanes: (g.ow - j0).min(16) }));
    loop {
        let tile_slots: [Option<Slot>; SLOTS] = std::array::from_fn(|_| slots.next());
        // SAFETY: AVX-512F (this function's contract); the bounds asserted above.
        unsafe {
            match tile_slots {
                [Some(a), Some(b), Some(c)] => tile::<R, 3>(g, input, weights, &bias, out, [a, b, c]),
                [Some(a), Some(b), None] => tile::<R, 2>(g, input, weights, &bias, out, [a, b]),
                [Some(a), None, None] => tile::<R, 1>(g, input, weights, &bias, out, [a]),
                _ => break,
            }
        }
    }
}

/// Pixels `j0 .. j0 + lanes` (`lanes ≤ 16`) of output row `i`.
#[derive(Clone, Copy)]
struct Slot {
    i: usize,
    j0: usize,
    lanes: usize,
}

/// Slots per tile: `R × SLOTS` accumulators (24 of AVX-512's 32 registers at `R = 8`).
const SLOTS: usize = 3;

/// The block's `R` channels at `V` slots: `R × V` accumulators of 16 pixels.
///
/// # Safety
/// AVX-512F, and the bounds [`block`] asserts.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const V: usize>(
    g: &Conv2dGeometry,
    input: &[f32],
    weights: &[f32],
    bias: &[f32; R],
    out: &mut [f32],
    slots: [Slot; V],
) {
    use std::arch::x86_64::*;
    let [ph, pw] = g.params.padding;
    let wp = g.w + 2 * pw;
    let plane = (g.h + 2 * ph) * wp;
    let p = g.oh * g.ow;
    // Lanes of each slot's vector that lie inside its row.
    let masks: [__mmask16; V] = std::array::from_fn(|k| ((1u32 << slots[k].lanes) - 1) as __mmask16);
    let mut acc = [[_mm512_setzero_ps(); R]; V];
    for row in acc.iter_mut() {
        for (c, a) in row.iter_mut().enumerate() {
            *a = _mm512_set1_ps(bias[c]);
        }
    }
    let mut taps = weights.chunks_exact(R);
    for ci in 0..g.c_in {
        for u in 0..g.kh {
            // Slot k's row `i + u < hp` of plane `ci`, from padded column `j0`.
            let bases: [*const f32; V] =
                std::array::from_fn(|k| input[ci * plane + (slots[k].i + u) * wp + slots[k].j0..].as_ptr());
            for v in 0..g.kw {
                // SAFETY: a slot reads padded columns `j0 + v .. j0 + v + lanes` of its row:
                // output column `j ≤ ow − 1` reads `j + v ≤ wp − 1`, inside the plane (the
                // slack covers the last row); masked-off lanes are not read.
                let xs: [__m512; V] =
                    std::array::from_fn(|k| unsafe { _mm512_maskz_loadu_ps(masks[k], bases[k].add(v)) });
                let tap = taps.next().unwrap_or(&[0.0; R]);
                for (c, &w) in tap.iter().enumerate() {
                    let wv = _mm512_set1_ps(w);
                    for (a, &x) in acc.iter_mut().zip(&xs) {
                        a[c] = _mm512_fmadd_ps(wv, x, a[c]);
                    }
                }
            }
        }
    }
    for (k, row) in acc.iter().enumerate() {
        let Slot { i, j0, .. } = slots[k];
        for (c, a) in row.iter().enumerate() {
            // SAFETY: channel c, row i, columns j0 .. j0 + lanes lie inside `out`.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(c * p + i * g.ow + j0), masks[k], *a) };
        }
    }
}
