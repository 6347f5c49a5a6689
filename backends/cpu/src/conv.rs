//! 2-D convolution as im2col + GEMM, with its two backward kernels.
//!
//! Per image `n` (`K = c_in·kh·kw`, `P = oh·ow`):
//! - forward:         `y[n] (c_out × P) = W (c_out × K) · cols[n] (K × P)`
//! - backward data:   `dcols (K × P) = Wᵀ · dy[n]`, then col2im scatters `dcols` into `dx[n]`
//! - backward weight: `dW (c_out × K) = Σ_n dy[n] · cols[n]ᵀ`
//!
//! A 1×1 kernel with stride 1 and no padding needs no im2col: `cols[n]` is `x[n]` itself.
//! The backward data of a stride-1 convolution with at least as many input as output channels
//! runs as a forward convolution of `dy` (flipped, transposed kernel; [`as_forward_of_dy`]):
//! im2col's plain copies of `dy` instead of col2im's scatter-adds. Conversely, the forward of a stride-1
//! convolution with fewer output than input channels runs as the backward data of the flipped
//! convolution: `y = col2im(W'ᵀ · x[n])`, a `[c_out·kh·kw, c_in]` product of `x` itself (no
//! im2col) scattered into `y` — the lowered matrix has `c_out·kh·kw` rows instead of
//! `c_in·kh·kw`, and the GEMM is `kh·kw` times wider in `c_out` (a decoder's 96 → 32 layer and
//! the 3-channel output convolution gain most; `cargo bench -p lisa-cpu`, figures in the
//! lisa-cpu README). Its weight gradient likewise is the flipped convolution's, with the
//! kernels flipped back.
//! Images run in parallel (single-threaded GEMMs) when there are at least as many images as
//! threads; otherwise images run in turn with multi-threaded GEMMs. The weight gradient sums
//! fixed groups of images in parallel and adds the group partials in order, so the result
//! does not depend on the thread count.

use std::mem::MaybeUninit;

use lisa_core::backend::geometry::Conv2dGeometry;
use rayon::prelude::*;

use crate::gemm::{MatRef, gemm_into, gemm_into_col_major, gemm_into_uninit};
use crate::simd::vectorised;
use crate::uninit::{assume_written, written_once};

/// Number of image groups the weight gradient is split into (fixed: determinism).
const WEIGHT_GRAD_GROUPS: usize = 8;

fn is_pointwise(g: &Conv2dGeometry) -> bool {
    g.kh == 1 && g.kw == 1 && g.params.stride == [1, 1] && g.params.padding == [0, 0]
}

/// The outputs `o` whose input index `stride·o + offset − pad` lies in `0..in_len`,
/// as a range `lo..hi` of `0..out_len` (empty when none does).
fn valid_range(out_len: usize, in_len: usize, offset: usize, stride: usize, pad: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(offset).div_ceil(stride);
    let hi = (in_len + pad).saturating_sub(offset).div_ceil(stride).min(out_len);
    (lo.min(hi), hi)
}

/// Lowers one image `x [c_in, h, w]` to `cols [K, P]` (zeros where the kernel reads padding).
/// Valid ranges are computed once per kernel tap, so the inner loop is a plain (strided) copy.
fn im2col(g: &Conv2dGeometry, x: &[f32], cols: &mut [f32]) {
    let [sh, sw] = g.params.stride;
    let [ph, pw] = g.params.padding;
    let p = g.oh * g.ow;
    // Stride 1 with rows as wide as the input's ("same" width): a tap's valid rows are one
    // contiguous run of the input plane, so it is copied in one piece and the columns the
    // kernel reads from padding are zeroed after (instead of one short copy per row).
    let whole_rows = sh == 1 && sw == 1 && g.ow == g.w;
    for c in 0..g.c_in {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for u in 0..g.kh {
            let (i0, i1) = valid_range(g.oh, g.h, u, sh, ph);
            for v in 0..g.kw {
                let (j0, j1) = valid_range(g.ow, g.w, v, sw, pw);
                let row = &mut cols[((c * g.kh + u) * g.kw + v) * p..][..p];
                row[..i0 * g.ow].fill(0.0);
                row[i1 * g.ow..].fill(0.0);
                if whole_rows && i0 < i1 && j0 < j1 {
                    // Output (i, j) reads input (i + u − ph, j + v − pw); the run from (i0, j0)
                    // to (i1 − 1, j1 − 1) is contiguous on both sides (row stride w = ow).
                    let (start, end) = (i0 * g.ow + j0, (i1 - 1) * g.ow + j1);
                    let src = (i0 + u - ph) * g.w + j0 + v - pw;
                    row[start..end].copy_from_slice(&plane[src..src + (end - start)]);
                    for i in i0..i1 {
                        let out_row = &mut row[i * g.ow..(i + 1) * g.ow];
                        out_row[..j0].fill(0.0);
                        out_row[j1..].fill(0.0);
                    }
                    continue;
                }
                for i in i0..i1 {
                    let src = &plane[(sh * i + u - ph) * g.w..][..g.w];
                    let out_row = &mut row[i * g.ow..(i + 1) * g.ow];
                    out_row[..j0].fill(0.0);
                    out_row[j1..].fill(0.0);
                    if j0 < j1 {
                        let q0 = sw * j0 + v - pw;
                        if sw == 1 {
                            out_row[j0..j1].copy_from_slice(&src[q0..q0 + (j1 - j0)]);
                        } else {
                            for (o, q) in out_row[j0..j1].iter_mut().zip((q0..).step_by(sw)) {
                                *o = src[q];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One image `x_n [c_in, h, w]` as the GEMM's `[K, P]` operand: itself for a pointwise
/// convolution, else lowered into `cols` by im2col.
fn lowered<'a>(g: &Conv2dGeometry, x_n: &'a [f32], cols: &'a mut [f32]) -> &'a [f32] {
    if is_pointwise(g) {
        x_n
    } else {
        im2col(g, x_n, cols);
        cols
    }
}

/// Scatter-adds `cols [K, P]` into one image `dx [c_in, h, w]` (the adjoint of im2col). `dx`
/// may come uninitialised: the image is zeroed here, just before the taps are added (one
/// image at a time, while it is in cache, instead of the whole output at allocation).
fn col2im<'d>(g: &Conv2dGeometry, cols: &[f32], dx: &'d mut [MaybeUninit<f32>]) -> &'d mut [f32] {
    let [sh, sw] = g.params.stride;
    let [ph, pw] = g.params.padding;
    let p = g.oh * g.ow;
    let dx = &mut dx[..g.c_in * g.h * g.w];
    dx.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written (zero).
    let dx = unsafe { assume_written(dx) };
    vectorised(|| {
        for (c, plane) in dx.chunks_mut(g.h * g.w).enumerate() {
            for u in 0..g.kh {
                let (i0, i1) = valid_range(g.oh, g.h, u, sh, ph);
                for v in 0..g.kw {
                    let (j0, j1) = valid_range(g.ow, g.w, v, sw, pw);
                    if j0 >= j1 {
                        continue;
                    }
                    let row = &cols[((c * g.kh + u) * g.kw + v) * p..][..p];
                    let q0 = sw * j0 + v - pw;
                    for i in i0..i1 {
                        let dst = &mut plane[(sh * i + u - ph) * g.w..][..g.w];
                        let src = &row[i * g.ow + j0..i * g.ow + j1];
                        if sw == 1 {
                            for (d, &s) in dst[q0..q0 + (j1 - j0)].iter_mut().zip(src) {
                                *d += s;
                            }
                        } else {
                            for (&s, q) in src.iter().zip((q0..).step_by(sw)) {
                                dst[q] += s;
                            }
                        }
                    }
                }
            }
        }
    });
    dx
}

/// Side of the square tiles a transpose moves at a time (both sides stay in cache).
const TRANSPOSE_TILE: usize = 32;

/// `dst [cols, rows] = srcᵀ` for a row-major `src [rows, cols]`, in square tiles.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for r0 in (0..rows).step_by(TRANSPOSE_TILE) {
        let r1 = (r0 + TRANSPOSE_TILE).min(rows);
        for c0 in (0..cols).step_by(TRANSPOSE_TILE) {
            let c1 = (c0 + TRANSPOSE_TILE).min(cols);
            for r in r0..r1 {
                let row = &src[r * cols..][c0..c1];
                for (c, &v) in (c0..c1).zip(row) {
                    dst[c * rows + r] = v;
                }
            }
        }
    }
}

/// [`transpose_into`] a fresh matrix, in parallel over blocks of `dst` rows.
fn transposed(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLOCK: usize = 64; // dst rows (src columns) per task
    let write = |dst: &mut [MaybeUninit<f32>]| {
        dst.par_chunks_mut(BLOCK * rows.max(1)).enumerate().for_each(|(b, block)| {
            let c0 = b * BLOCK;
            let c1 = (c0 + BLOCK).min(cols);
            // The block holds dst rows c0..c1: transpose src's columns c0..c1 into it.
            for r0 in (0..rows).step_by(TRANSPOSE_TILE) {
                let r1 = (r0 + TRANSPOSE_TILE).min(rows);
                for r in r0..r1 {
                    for (c, &v) in (c0..c1).zip(&src[r * cols + c0..r * cols + c1]) {
                        block[(c - c0) * rows + r].write(v);
                    }
                }
            }
        })
    };
    // SAFETY: block `b` holds dst rows `c0..c1` (all `rows` elements each), and every (r, c)
    // with r < rows, c in c0..c1 is written; the blocks cover all `cols` dst rows.
    unsafe { written_once(rows * cols, write) }.0
}

thread_local! {
    /// Each thread's im2col / transpose scratch, kept between calls: every user overwrites the
    /// part it takes before reading it, so reusing it saves an allocation and a zeroing pass
    /// over a buffer the size of the whole lowered image per call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest scratch a thread keeps between calls (4 Mi floats, 16 MiB): bigger ones (SD's
/// 64×64 levels) are allocated per call, so idle threads do not hold them, and their zeroing
/// is small next to the GEMMs of such layers.
const SCRATCH_KEPT: usize = 4 << 20;

/// Runs `f` on `len` floats of this thread's scratch (stale values: `f` must write before it
/// reads). A thread that re-enters while its scratch is lent (rayon may run another task of
/// the same loop on a thread waiting inside a parallel GEMM) gets a fresh buffer instead.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if len > SCRATCH_KEPT {
        return f(&mut vec![0.0f32; len]);
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0f32; len]),
    })
}

fn parallel_over_images(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

/// Runs `per_image(n, out_n, scratch, parallel_gemm)` for every image, in parallel over images
/// or in turn; `scratch` holds `scratch_len` floats of stale values.
fn for_each_image<T: Send>(
    batch: usize,
    out: &mut [T],
    out_per_image: usize,
    scratch_len: usize,
    per_image: impl Fn(usize, &mut [T], &mut [f32], bool) + Sync,
) {
    if parallel_over_images(batch) {
        // One contiguous run of images per thread, each with one scratch buffer.
        let per_task = batch.div_ceil(rayon::current_num_threads());
        out.par_chunks_mut(out_per_image * per_task).enumerate().for_each(|(t, run)| {
            with_scratch(scratch_len, |scratch| {
                for (i, o) in run.chunks_mut(out_per_image).enumerate() {
                    per_image(t * per_task + i, o, scratch, false);
                }
            })
        });
    } else {
        with_scratch(scratch_len, |scratch| {
            for (n, o) in out.chunks_mut(out_per_image).enumerate() {
                per_image(n, o, scratch, true);
            }
        })
    }
}

/// Forward: `y = W ⋆ x + b`, `x [n, c_in, h, w]`, `w [c_out, c_in, kh, kw]`.
pub(crate) fn conv2d(g: &Conv2dGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.c_out < g.c_in
        && worth_flipping(g)
        && let Some((flipped, w_t)) = as_forward_of_dy(g, w)
    {
        // Fewer outputs than inputs (a decoder's convolution after a concat, an output
        // convolution): the forward is the backward data of the flipped convolution (each is
        // the other's adjoint), which multiplies `x` itself, with no im2col, by a `[K', c_in]`
        // matrix (`K' = c_out·kh·kw < K`) and scatter-adds the product into `y` (col2im).
        let mut y = backward_data_by_col2im(&flipped, x, &w_t);
        if let Some(b) = bias {
            let p = g.oh * g.ow;
            y.par_chunks_mut(g.c_out * p).for_each(|y_n| add_bias(y_n, b, p));
        }
        return y;
    }
    conv2d_im2col(g, x, w, bias)
}

/// The forward as im2col + GEMM per image (a plain GEMM for a pointwise convolution).
fn conv2d_im2col(g: &Conv2dGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let len = g.batch * g.c_out * p;
    let scratch = if pointwise { 0 } else { k * p };
    let write = |y: &mut [MaybeUninit<f32>]| {
        for_each_image(g.batch, y, g.c_out * p, scratch, |n, y_n, cols, par| {
            let cols = lowered(g, &x[n * in_img..(n + 1) * in_img], cols);
            gemm_into_uninit(y_n, MatRef::row_major(w, g.c_out, k), MatRef::row_major(cols, k, p), par);
            // SAFETY: the GEMM just wrote every element of `y_n`.
            let y_n = unsafe { assume_written(y_n) };
            if let Some(b) = bias {
                add_bias(y_n, b, p);
            }
        })
    };
    // SAFETY: each image's GEMM writes its whole block (reading none of it); the images'
    // blocks cover all `len` elements.
    let (y, ()) = unsafe { written_once(len, write) };
    y
}

/// For a stride-1 convolution whose padding is at most `k − 1` on each axis, the geometry of
/// its backward data as a forward convolution: `dx = W' ⋆ dy` with
/// `W'[ci, co, u, v] = W[co, ci, kh−1−u, kw−1−v]` and padding `k − 1 − p` (the transposed
/// convolution of a stride-1 convolution is a convolution), and `W'`.
fn as_forward_of_dy(g: &Conv2dGeometry, w: &[f32]) -> Option<(Conv2dGeometry, Vec<f32>)> {
    let flipped = flipped_geometry(g)?;
    Some((flipped, flip_kernels(w, g.c_out, g.c_in, g.kh * g.kw)))
}

/// The geometry of [`as_forward_of_dy`]'s convolution: from `dy`'s grid (`c_out` channels) to
/// `x`'s (`c_in`), padding `k − 1 − p`; None unless stride 1, not pointwise, padding < k.
fn flipped_geometry(g: &Conv2dGeometry) -> Option<Conv2dGeometry> {
    let [ph, pw] = g.params.padding;
    if g.params.stride != [1, 1] || is_pointwise(g) || ph >= g.kh || pw >= g.kw {
        return None;
    }
    let params = lisa_core::backend::Conv2dParams { stride: [1, 1], padding: [g.kh - 1 - ph, g.kw - 1 - pw] };
    Some(Conv2dGeometry { c_in: g.c_out, h: g.oh, w: g.ow, c_out: g.c_in, oh: g.h, ow: g.w, params, ..*g })
}

/// Whether a path that copies the kernels flipped ([`flip_kernels`]: `c_in·c_out·kh·kw`
/// strided copies per call) pays for itself: each kernel element then serves `batch·oh·ow`
/// multiply-adds, and below [`FLIP_MIN_PIXELS`] of them the copy costs more than the path
/// saves (SD's 8×8 and 16×16 layers at batch 1 were several times slower that way than with
/// im2col, figures in the lisa-cpu README; the toy's layers at batch 32 serve 2048–32768).
fn worth_flipping(g: &Conv2dGeometry) -> bool {
    g.batch * g.oh * g.ow >= FLIP_MIN_PIXELS
}

/// See [`worth_flipping`].
const FLIP_MIN_PIXELS: usize = 2048;

/// `[a, b, taps] → [b, a, taps reversed]`: `W'[ci, co, u, v] = W[co, ci, kh−1−u, kw−1−v]` for
/// `a = c_out`, `b = c_in` (its own inverse, with `a` and `b` swapped).
fn flip_kernels(w: &[f32], a: usize, b: usize, taps: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for j in 0..b {
        for i in 0..a {
            out.extend(w[(i * b + j) * taps..][..taps].iter().rev());
        }
    }
    out
}

/// `y[c, :] += b[c]` over the `plane`-value planes of one image.
fn add_bias(y: &mut [f32], b: &[f32], plane: usize) {
    for (row, &bv) in y.chunks_mut(plane).zip(b) {
        row.iter_mut().for_each(|v| *v += bv);
    }
}

/// Backward data: for stride 1 with at least as many input as output channels, a forward
/// convolution of `dy` (im2col of `dy`, `c_out·kh·kw` rows); otherwise `dx = col2im(Wᵀ · dy)`
/// (the mirror image of [`conv2d`]'s choice: the lowered side is the narrower one).
pub(crate) fn conv2d_backward_data(g: &Conv2dGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    if g.c_in >= g.c_out
        && worth_flipping(g)
        && let Some((flipped, w_t)) = as_forward_of_dy(g, w)
    {
        return conv2d(&flipped, dy, &w_t, None);
    }
    backward_data_by_col2im(g, dy, w)
}

/// `dx = col2im(Wᵀ · dy)` per image (`Wᵀ · dy` alone for a pointwise convolution).
fn backward_data_by_col2im(g: &Conv2dGeometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let scratch = if pointwise { 0 } else { k * p };
    let write = |dx: &mut [MaybeUninit<f32>]| {
        for_each_image(g.batch, dx, in_img, scratch, |n, dx_n, dcols, par| {
            let dy_n = MatRef::row_major(&dy[n * g.c_out * p..(n + 1) * g.c_out * p], g.c_out, p);
            let w_t = MatRef::transposed(w, k, g.c_out);
            if pointwise {
                gemm_into_uninit(dx_n, w_t, dy_n, par);
            } else {
                gemm_into(dcols, false, w_t, dy_n, par);
                col2im(g, dcols, dx_n);
            }
        })
    };
    // SAFETY: per image, the pointwise GEMM writes its whole `[c_in, P]` block, and col2im
    // writes every element of its image; the images' blocks cover the output.
    unsafe { written_once(g.batch * in_img, write) }.0
}

/// Backward weight: `dW = Σ_n dy[n] · cols[n]ᵀ` over fixed groups of images.
///
/// Both `dy[n] [c_out, P]` and `cols[n] [K, P]` run along the reduction axis `P`, a layout the
/// GEMM packs element by element when it is its left operand (that packing weighed heavily in
/// the profile of the toy pretraining step; figures in the lisa-cpu README). So the small one,
/// `dy[n]`, is transposed to `[P, c_out]` (`K/c_out` times less to move than `cols[n]`), and
/// the group's sum is accumulated column-major as `dWᵀ [K, c_out]`, transposed once per group
/// at the end.
pub(crate) fn conv2d_backward_weight(g: &Conv2dGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    if g.c_out < g.c_in
        && worth_flipping(g)
        && let Some(flipped) = flipped_geometry(g)
    {
        // Fewer outputs than inputs: the weight gradient of the flipped convolution (input
        // `dy`, output gradient `x`) holds the same sums, `dW'[ci, co, u', v'] =
        // dW[co, ci, kh−1−u', kw−1−v']`, and lowers `dy` (`c_out·kh·kw` rows) instead of `x`.
        let dw_flipped = conv2d_backward_weight(&flipped, dy, x);
        return flip_kernels(&dw_flipped, g.c_in, g.c_out, g.kh * g.kw);
    }
    backward_weight_lowering_x(g, x, dy)
}

/// The weight gradient as documented on [`conv2d_backward_weight`], lowering `x`.
fn backward_weight_lowering_x(g: &Conv2dGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (k, p, in_img) = (g.c_in * g.kh * g.kw, g.oh * g.ow, g.c_in * g.h * g.w);
    let pointwise = is_pointwise(g);
    let groups = WEIGHT_GRAD_GROUPS.min(g.batch);
    let per_group = g.batch.div_ceil(groups);
    // Too few groups to occupy the threads: let each GEMM use them instead.
    let par_gemm = groups < rayon::current_num_threads();
    let partials: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|grp| {
            let mut dw_t = vec![0.0f32; k * g.c_out]; // [K, c_out] = dW column-major
            let cols_len = if pointwise { 0 } else { k * p };
            // [K, P] lowered image, then [P, c_out] transposed dy.
            with_scratch(cols_len + p * g.c_out, |scratch| {
                let (cols, dy_t) = scratch.split_at_mut(cols_len);
                for (i, n) in (grp * per_group..((grp + 1) * per_group).min(g.batch)).enumerate() {
                    let cols = lowered(g, &x[n * in_img..(n + 1) * in_img], cols);
                    let dy_n = &dy[n * g.c_out * p..(n + 1) * g.c_out * p];
                    transpose_into(dy_n, g.c_out, p, dy_t);
                    gemm_into_col_major(
                        &mut dw_t,
                        i > 0,
                        MatRef::transposed(dy_t, g.c_out, p),
                        MatRef::transposed(cols, p, k),
                        par_gemm,
                    );
                }
            });
            transposed(&dw_t, k, g.c_out)
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_else(|| vec![0.0f32; g.c_out * k]);
    for part in partials {
        total.iter_mut().zip(&part).for_each(|(t, &v)| *t += v);
    }
    total
}

#[cfg(test)]
mod tests {
    use lisa_core::backend::{Conv2dParams, Shape};

    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0 - 0.5)
            .collect()
    }

    fn assert_close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * scale, "{what}: element {i}: {x} vs {y}");
        }
    }

    /// The paths that flip the kernels (taken from [`FLIP_MIN_PIXELS`] pixels on, so the
    /// conformance suite's small shapes never reach them) equal the direct ones: the narrowing
    /// forward by col2im against im2col + GEMM, the backward data as a forward convolution of
    /// `dy` against col2im, the flipped weight gradient against the lowered `x`; for a 3×3
    /// "same" and a 3×2 kernel with padding (2, 0).
    #[test]
    fn flipped_paths_equal_the_direct_ones() {
        let cases =
            [(Conv2dParams::same(3), [3usize, 3usize]), (Conv2dParams { stride: [1, 1], padding: [2, 0] }, [3, 2])];
        for (params, [kh, kw]) in cases {
            let (batch, c_in, c_out, h, w) = (3, 7, 5, 29, 31);
            let g = Conv2dGeometry::new(
                "test",
                &Shape::new([batch, c_in, h, w]),
                &Shape::new([c_out, c_in, kh, kw]),
                params,
            )
            .unwrap();
            assert!(worth_flipping(&g) && flipped_geometry(&g).is_some(), "the case must take the flipped paths");
            let (x, wt, b) = (values(batch * c_in * h * w, 1), values(c_out * c_in * kh * kw, 2), values(c_out, 3));
            let dy = values(batch * c_out * g.oh * g.ow, 4);
            assert_close("forward", &conv2d(&g, &x, &wt, Some(&b)), &conv2d_im2col(&g, &x, &wt, Some(&b)));
            // The backward data of the widening mirror image (c_out > c_in) goes by col2im;
            // computed as a forward of dy it must agree.
            let (flipped, w_t) = as_forward_of_dy(&g, &wt).unwrap();
            assert_close("backward data", &conv2d(&flipped, &dy, &w_t, None), &backward_data_by_col2im(&g, &dy, &wt));
            assert_close(
                "backward weight",
                &conv2d_backward_weight(&g, &x, &dy),
                &backward_weight_lowering_x(&g, &x, &dy),
            );
        }
    }
}
