//! A safe, bounds-checked front to `gemm::gemm` for strided f32 matrices.

use gemm::Parallelism;
use std::mem::MaybeUninit;

/// A read-only strided matrix: element `(i, j)` is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix over the first `rows·cols` elements of `data`.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// The transpose view of a row-major `cols × rows` matrix (a `rows × cols` matrix).
    pub(crate) fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, 1, rows)
    }

    /// A general strided view. Panics (a bug in this crate, never user input: callers derive
    /// sizes from validated shapes) if the view does not fit in `data`.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "MatRef out of bounds: {rows}x{cols} strides ({row_stride}, {col_stride}) over {}",
                data.len()
            );
        }
        Self { data, rows, cols, row_stride, col_stride }
    }
}

/// `dst (m × n, row-major) = [dst +] a (m × k) · b (k × n)`.
pub(crate) fn gemm_into(dst: &mut [f32], accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, parallel: bool) {
    gemm_strided(dst, Layout::RowMajor, accumulate, a, b, parallel)
}

/// `dst (m × n, column-major: element (i, j) at i + j·m) = [dst +] a (m × k) · b (k × n)`.
///
/// The `gemm` crate computes into a column-major destination as given, and packs its left
/// operand fast when that operand's rows are contiguous (row stride 1); a row-major
/// destination makes it transpose the whole product (`dstᵀ = bᵀ·aᵀ`), which swaps the roles.
pub(crate) fn gemm_into_col_major(dst: &mut [f32], accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, parallel: bool) {
    gemm_strided(dst, Layout::ColMajor, accumulate, a, b, parallel)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    RowMajor,
    ColMajor,
}

/// `dst (m × n, row-major) = a (m × k) · b (k × n)` into memory not yet written: every one of
/// the `m·n` elements is written and none is read, so the caller need not zero it first (the
/// convolutions' outputs).
pub(crate) fn gemm_into_uninit(dst: &mut [MaybeUninit<f32>], a: MatRef<'_>, b: MatRef<'_>, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() >= m * n, "gemm_into_uninit: {m}x{k} · {}x{n} into {}", b.rows, dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(MaybeUninit::new(0.0));
        return;
    }
    // SAFETY: as in `gemm_strided`; with `accumulate = false` the `gemm` crate writes `dst`
    // without reading it, so its elements need not be initialised.
    unsafe { raw_gemm(dst.as_mut_ptr().cast::<f32>(), Layout::RowMajor, false, a, b, parallel) }
}

fn gemm_strided(dst: &mut [f32], layout: Layout, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(b.rows == k && dst.len() >= m * n, "gemm_into: {m}x{k} · {}x{n} into {}", b.rows, dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: `dst` holds at least m·n initialised elements (asserted above).
    unsafe { raw_gemm(dst.as_mut_ptr(), layout, accumulate, a, b, parallel) }
}

/// The `gemm` crate's product into `dst`, for `m, n, k > 0`.
///
/// # Safety
/// `dst` must be valid for writes of `m·n` elements in `layout` (and for reads when
/// `accumulate`), and must not alias `a` or `b`.
unsafe fn raw_gemm(dst: *mut f32, layout: Layout, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert!(b.rows == k && m > 0 && n > 0 && k > 0);
    let parallelism = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
    let (dst_cs, dst_rs) = match layout {
        Layout::RowMajor => (1, n as isize),
        Layout::ColMajor => (m as isize, 1),
    };
    // SAFETY: `a` and `b` were bounds-checked at construction (every element (i, j) with
    // i < rows, j < cols lies inside their slices), `b.rows == k` (the callers assert it),
    // and `dst` is valid for m·n elements addressed row-major (row stride n, column stride 1)
    // or column-major (row stride 1, column stride m) and does not alias `a`/`b` (this
    // function's contract). Strides fit `isize` because they index into live allocations.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
