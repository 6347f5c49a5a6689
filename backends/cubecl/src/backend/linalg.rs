//! Matmul and conv2d (im2col + matmul, with the batch folded into the columns).

use cubecl::prelude::*;
use lisa_core::Result;
use lisa_core::backend::geometry::{Conv2dGeometry, MatmulGeometry};
use lisa_core::backend::{Conv2dParams, ConvOps, DType, MatmulOps, ReduceOps, Shape, TensorOps, Transpose};

use super::{CubeBackend, T, alloc, arg, check_dtype, table, u32_of};
use crate::device::CubeDevice;
use crate::kernels::conv as k;
use crate::kernels::matmul::{self as mt, TILE, matmul as mm};
use crate::launch::{grid_1d, with_float};
use crate::precision::{F32Gemm, f32_gemm, half_gemm};

/// The sizes of `batch` products `op(a)·op(b)`: `op(a)` is `m×k`, `op(b)` is `k×n`.
#[derive(Debug, Clone, Copy)]
struct Gemm {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    t: Transpose,
}

/// `out[b] = op(a[b])·op(b[b])` for `batch` matrices; `a` holds `m×k` (or `k×m` when
/// transposed), `b` holds `k×n` (or `n×k`).
///
/// The tiled kernel of this crate runs every dtype (transposes as strides). f32 goes to cubek's
/// TF32 tensor-core matmul instead when the process opted in ([`crate::set_f32_matmul`]) or
/// `LISA_CUBECL_F32_GEMM` names a cubek kernel ([`f32_gemm`]); f16/bf16 go to cubek's CMMA
/// matmul on tensor cores where the device has them ([`half_gemm`]). Transposed operands are
/// made contiguous first for cubek, and a problem cubek refuses runs on the tiled kernel.
fn gemm<R: Runtime>(op: &'static str, (a, b): (&T<R>, &T<R>), g: Gemm, dtype: DType, out_shape: Shape) -> Result<T<R>> {
    let device = &a.device;
    let out = alloc(device, out_shape, dtype)?;
    if out.is_empty() {
        return Ok(out);
    }
    if g.k == 0 {
        return CubeBackend::<R>::full(&out.shape, 0.0, dtype, device);
    }
    let chosen = if dtype == DType::F32 { f32_gemm() } else { half_gemm(device.has_tensor_cores(dtype)) };
    {
        let strategy = match chosen.map_err(|m| lisa_core::Error::invalid(op, m))? {
            F32Gemm::Tiled => return tiled(op, a, b, &out, g),
            F32Gemm::Cubek(strategy) => strategy,
        };
        let a = if g.t.a { transposed(a, g.batch, g.k, g.m)? } else { a.clone() };
        let b = if g.t.b { transposed(b, g.batch, g.n, g.k)? } else { b.clone() };
        let contiguous = Gemm { t: Transpose::default(), ..g };
        if cubek_matmul(device, &strategy, (&a, &b), &out, contiguous).is_ok() {
            return Ok(out);
        }
        crate::precision::count_cubek_refusal();
        tiled(op, &a, &b, &out, contiguous)
    }
}

/// `x [batch, rows, cols]` → `[batch, cols, rows]`, contiguous.
fn transposed<R: Runtime>(x: &T<R>, batch: usize, rows: usize, cols: usize) -> Result<T<R>> {
    const OP: &str = "transpose";
    let out = alloc(&x.device, Shape::new([batch, cols, rows]), x.dtype)?;
    let (count, dim) = grid_1d(out.len());
    with_float!(x.dtype, F => mt::transpose::launch::<F, R>(
        &x.device.client, count, dim, arg(x), arg(&out), u32_of(OP, rows)?, u32_of(OP, cols)?
    ));
    Ok(out)
}

/// cubek's matmul with `strategy` ([`f32_gemm`], [`half_gemm`]) on contiguous
/// `[batch, m, k] × [batch, k, n]` in the output's dtype: f32 throughout, or half inputs and
/// output with f32 accumulation.
fn cubek_matmul<R: Runtime>(
    device: &CubeDevice<R>,
    strategy: &cubek::matmul::launch::Strategy,
    (a, b): (&T<R>, &T<R>),
    out: &T<R>,
    Gemm { batch, m, k, n, .. }: Gemm,
) -> std::result::Result<(), String> {
    use cubecl::std::tensor::TensorHandle;
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::launch_ref;
    use cubek::std::InputBinding;
    let f = match out.dtype {
        DType::F32 => f32::as_type_native_unchecked(),
        DType::F16 => half::f16::as_type_native_unchecked(),
        DType::BF16 => half::bf16::as_type_native_unchecked(),
    };
    let st = f.storage_type();
    let lhs = TensorHandle::<R>::new_contiguous(vec![batch, m, k], a.handle.clone(), st);
    let rhs = TensorHandle::<R>::new_contiguous(vec![batch, k, n], b.handle.clone(), st);
    let dst = TensorHandle::<R>::new_contiguous(vec![batch, m, n], out.handle.clone(), st);
    launch_ref::<R>(
        strategy,
        &device.client,
        InputBinding::Normal(lhs.binding(), st),
        InputBinding::Normal(rhs.binding(), st),
        dst.binding(),
        &mut if out.dtype == DType::F32 {
            MatmulElems::from_single_dtype(f)
        } else {
            // Half inputs and output, f32 in the stage and registers (the accumulator).
            MatmulElems::from_globals(&MatmulGlobalElems { lhs: st, rhs: st, out: st })
        },
    )
    .map_err(|e| format!("{e:?}"))
}

/// The shared-memory tiled kernel (any dtype; transposes as strides).
fn tiled<R: Runtime>(op: &'static str, a: &T<R>, b: &T<R>, out: &T<R>, g: Gemm) -> Result<T<R>> {
    let Gemm { batch, m, k, n, t } = g;
    let (device, dtype) = (&out.device, out.dtype);
    let (a_row, a_col) = if t.a { (1, m) } else { (k, 1) };
    let (b_row, b_col) = if t.b { (1, k) } else { (n, 1) };
    let count = CubeCount::Static(
        u32_of(op, n.div_ceil(TILE as usize))?,
        u32_of(op, m.div_ceil(TILE as usize))?,
        u32_of(op, batch)?,
    );
    let dim = CubeDim::new_2d(TILE, TILE);
    let u = |v: usize| u32_of(op, v);
    with_float!(dtype, F => mm::launch::<F, R>(
        &device.client, count, dim, arg(a), arg(b), arg(out),
        u(m)?, u(k)?, u(n)?, u(a_row)?, u(a_col)?, u(b_row)?, u(b_col)?, TILE
    ));
    Ok(out.clone())
}

impl<R: Runtime> MatmulOps for CubeBackend<R> {
    fn matmul(a: &T<R>, b: &T<R>, t: Transpose) -> Result<T<R>> {
        let dtype = Self::expect_same_dtype("matmul", a, b)?;
        check_dtype("matmul", &a.device, dtype)?;
        let g = MatmulGeometry::new("matmul", &a.shape, &b.shape, t)?;
        gemm("matmul", (a, b), Gemm { batch: g.batch, m: g.m, k: g.k, n: g.n, t }, dtype, g.output_shape())
    }
}

/// The geometry table of the conv kernels.
fn conv_table<R: Runtime>(device: &CubeDevice<R>, g: &Conv2dGeometry) -> Result<ArrayArg<R>> {
    let p = g.params;
    table(
        device,
        &[g.batch, g.c_in, g.h, g.w, g.kh, g.kw, g.oh, g.ow, p.stride[0], p.stride[1], p.padding[0], p.padding[1]],
    )
}

/// `x [n, c, h, w]` → columns `[c·kh·kw, n·oh·ow]`, or with `per_image` `[n, c·kh·kw, oh·ow]`.
fn im2col<R: Runtime>(x: &T<R>, g: &Conv2dGeometry, per_image: bool) -> Result<T<R>> {
    let rows = g.c_in * g.kh * g.kw;
    let p = g.oh * g.ow;
    let shape = if per_image { Shape::new([g.batch, rows, p]) } else { Shape::new([rows, g.batch * p]) };
    let col = alloc(&x.device, shape, x.dtype)?;
    if !col.is_empty() {
        let (count, dim) = grid_1d(col.len());
        let meta = conv_table(&x.device, g)?;
        with_float!(x.dtype, F => k::im2col::launch::<F, R>(
            &x.device.client, count, dim, arg(x), arg(&col), meta, per_image
        ));
    }
    Ok(col)
}

/// The most values the weight gradient's per-image partial products may hold (64 MiB of f32).
const PER_IMAGE_PARTIALS_MAX: usize = 16 << 20;

impl<R: Runtime> ConvOps for CubeBackend<R> {
    fn conv2d(x: &T<R>, weight: &T<R>, bias: Option<&T<R>>, params: Conv2dParams) -> Result<T<R>> {
        const OP: &str = "conv2d";
        let dtype = Self::expect_same_dtype(OP, x, weight)?;
        let g = Conv2dGeometry::new(OP, &x.shape, &weight.shape, params)?;
        if let Some(b) = bias {
            Self::expect_same_dtype(OP, x, b)?;
            Shape::new([g.c_out]).expect_eq(OP, &b.shape)?;
        }
        check_dtype(OP, &x.device, dtype)?;
        let out = alloc(&x.device, g.output_shape(), dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let rows = g.c_in * g.kh * g.kw;
        let cols = g.batch * g.oh * g.ow;
        let col = im2col(x, &g, false)?;
        // [c_out, rows] · [rows, n·p] = [c_out, n·p]
        let sizes = Gemm { batch: 1, m: g.c_out, k: rows, n: cols, t: Transpose::default() };
        let y = gemm(OP, (weight, &col), sizes, dtype, Shape::new([g.c_out, cols]))?;
        let (count, dim) = grid_1d(out.len());
        let p = g.oh * g.ow;
        let bias_arg = arg(bias.unwrap_or(&y));
        with_float!(dtype, F => k::cnp_to_ncp::launch::<F, R>(
            &x.device.client, count, dim, arg(&y), bias_arg, arg(&out),
            u32_of(OP, g.batch)?, u32_of(OP, g.c_out)?, u32_of(OP, p)?, bias.is_some()
        ));
        Ok(out)
    }
    fn conv2d_backward_data(grad_out: &T<R>, weight: &T<R>, input_shape: &Shape, params: Conv2dParams) -> Result<T<R>> {
        const OP: &str = "conv2d_backward_data";
        let dtype = Self::expect_same_dtype(OP, grad_out, weight)?;
        let g = Conv2dGeometry::new(OP, input_shape, &weight.shape, params)?;
        g.output_shape().expect_eq(OP, &grad_out.shape)?;
        check_dtype(OP, &weight.device, dtype)?;
        let device = &weight.device;
        let dx = alloc(device, input_shape.clone(), dtype)?;
        if dx.is_empty() {
            return Ok(dx);
        }
        let rows = g.c_in * g.kh * g.kw;
        let cols = g.batch * g.oh * g.ow;
        let gy = to_cnp(grad_out, &g)?;
        // [rows, c_out] · [c_out, n·p] = [rows, n·p]
        let sizes = Gemm { batch: 1, m: rows, k: g.c_out, n: cols, t: Transpose { a: true, b: false } };
        let dcol = gemm(OP, (weight, &gy), sizes, dtype, Shape::new([rows, cols]))?;
        let (count, dim) = grid_1d(dx.len());
        let meta = conv_table(device, &g)?;
        with_float!(dtype, F => k::col2im::launch::<F, R>(&device.client, count, dim, arg(&dcol), arg(&dx), meta));
        Ok(dx)
    }
    /// `∂L/∂b[o] = Σ_{n,i,j} ∂L/∂y[n, o, i, j]` in two sums (over pixels, then images), so that
    /// `n·c_out` threads share the work rather than `c_out`.
    fn conv2d_backward_bias(grad_out: &T<R>) -> Result<T<R>> {
        const OP: &str = "conv2d_backward_bias";
        grad_out.shape.expect_rank(OP, 4)?;
        let (n, c) = (grad_out.shape.dims()[0], grad_out.shape.dims()[1]);
        let per_image = Self::sum_to_shape(grad_out, &Shape::new([n, c, 1, 1]))?;
        Self::reshape(&Self::sum_to_shape(&per_image, &Shape::new([1, c, 1, 1]))?, &Shape::new([c]))
    }
    fn conv2d_backward_weight(x: &T<R>, grad_out: &T<R>, weight_shape: &Shape, params: Conv2dParams) -> Result<T<R>> {
        const OP: &str = "conv2d_backward_weight";
        let dtype = Self::expect_same_dtype(OP, x, grad_out)?;
        let g = Conv2dGeometry::new(OP, &x.shape, weight_shape, params)?;
        g.output_shape().expect_eq(OP, &grad_out.shape)?;
        check_dtype(OP, &x.device, dtype)?;
        let rows = g.c_in * g.kh * g.kw;
        let cols = g.batch * g.oh * g.ow;
        if weight_shape.num_elements()? == 0 || cols == 0 {
            return Self::full(weight_shape, 0.0, dtype, &x.device);
        }
        let partials = g.batch.saturating_mul(g.c_out).saturating_mul(rows);
        if g.batch > 1 && partials <= PER_IMAGE_PARTIALS_MAX {
            // The reduction (n·p long) split over images: one product per image, in parallel,
            // then their sum. A single product with a [c_out, rows] output has too few tiles
            // to fill a GPU while each walks all n·p columns.
            let col = im2col(x, &g, true)?;
            let p = g.oh * g.ow;
            // [n][c_out, p] · [n][rows, p]ᵀ = [n][c_out, rows]; grad_out is already [n, c_out, p].
            let sizes = Gemm { batch: g.batch, m: g.c_out, k: p, n: rows, t: Transpose { a: false, b: true } };
            let per_image = gemm(OP, (grad_out, &col), sizes, dtype, Shape::new([g.batch, g.c_out, rows]))?;
            let dw = Self::sum_to_shape(&per_image, &Shape::new([1, g.c_out, rows]))?;
            return Self::reshape(&dw, weight_shape);
        }
        let col = im2col(x, &g, false)?;
        let gy = to_cnp(grad_out, &g)?;
        // [c_out, n·p] · [rows, n·p]ᵀ = [c_out, rows]
        let sizes = Gemm { batch: 1, m: g.c_out, k: cols, n: rows, t: Transpose { a: false, b: true } };
        gemm(OP, (&gy, &col), sizes, dtype, weight_shape.clone())
    }
}

/// Upsampling convolutions by the definition (upsample, then convolve); the sub-pixel form
/// lisa-cpu uses is future work here.
impl<R: Runtime> lisa_core::backend::UpsampleConvOps for CubeBackend<R> {}

/// `[n, c_out, oh, ow]` → `[c_out, n·oh·ow]`.
fn to_cnp<R: Runtime>(grad_out: &T<R>, g: &Conv2dGeometry) -> Result<T<R>> {
    const OP: &str = "conv2d backward";
    let p = g.oh * g.ow;
    let out = alloc(&grad_out.device, Shape::new([g.c_out, g.batch * p]), grad_out.dtype)?;
    if !out.is_empty() {
        let (count, dim) = grid_1d(out.len());
        with_float!(grad_out.dtype, F => k::ncp_to_cnp::launch::<F, R>(
            &grad_out.device.client, count, dim, arg(grad_out), arg(&out),
            u32_of(OP, g.batch)?, u32_of(OP, g.c_out)?, u32_of(OP, p)?
        ));
    }
    Ok(out)
}
