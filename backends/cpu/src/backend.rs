use lisa_core::backend::geometry::{
    Conv2dGeometry, Conv2dParams, GroupNormGeometry, GroupNormParams, MatmulGeometry, Transpose, slice_channels_shape,
    upsample_backward_input_shape, upsample_output_shape,
};
use lisa_core::backend::{
    AdamWParams, ArithOps, AttentionDims, AttentionForward, AttentionGrads, AttentionOps, AttentionParams,
    BackendTypes, BinaryOp, ConvOps, DType, FusedOps, GroupNormGrads, GroupNormOutput, LayoutOps, MatmulOps, NormOps,
    ReduceOps, Shape, TensorOps, UnaryOp, UpsampleConvOps, check_upsample_conv_kernel, upsampled_shape,
};
use lisa_core::lisa::{LisaConfig, LisaLoss, SampleTerms, lisa_loss_fused};
use lisa_core::rng::fill_normal;
use lisa_core::{Error, Result};
use rayon::prelude::*;
use std::borrow::Cow;

use crate::gemm::{MatRef, gemm_into};
use crate::tensor::CpuTensor;
use crate::{CHUNK, attention, conv, elementwise, fused, layout, norm, reduce, upsample_conv};

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuBackend;

/// Host memory and the current rayon pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuDevice;

type T = CpuTensor;

fn same_shape(op: &'static str, a: &T, b: &T) -> Result<()> {
    a.shape.expect_eq(op, &b.shape)
}

impl BackendTypes for CpuBackend {
    type Device = CpuDevice;
    type Tensor = CpuTensor;
    fn name() -> &'static str {
        "cpu"
    }
}

impl TensorOps for CpuBackend {
    fn default_device() -> CpuDevice {
        CpuDevice
    }
    fn supports_dtype(_: &CpuDevice, _: DType) -> bool {
        true
    }
    fn from_slice(data: &[f32], shape: &Shape, dtype: DType, _: &CpuDevice) -> Result<T> {
        CpuTensor::from_f32(data.to_vec(), shape.clone(), dtype)
    }
    fn to_vec(t: &T) -> Result<Vec<f32>> {
        Ok(t.values().into_owned())
    }
    fn shape(t: &T) -> Shape {
        t.shape.clone()
    }
    fn dtype(t: &T) -> DType {
        t.dtype()
    }
    fn device(_: &T) -> CpuDevice {
        CpuDevice
    }
    fn reshape(t: &T, shape: &Shape) -> Result<T> {
        let n = shape.num_elements()?;
        if n != t.len() {
            return Err(Error::LengthMismatch { op: "reshape", expected: t.len(), got: n });
        }
        Ok(CpuTensor { storage: t.storage.clone(), shape: shape.clone() })
    }
    fn cast(t: &T, dtype: DType) -> Result<T> {
        if t.dtype() == dtype {
            return Ok(t.clone());
        }
        Ok(CpuTensor::store(t.values().into_owned(), t.shape.clone(), dtype))
    }
    fn full(shape: &Shape, value: f32, dtype: DType, _: &CpuDevice) -> Result<T> {
        Ok(CpuTensor::store(vec![value; shape.num_elements()?], shape.clone(), dtype))
    }
    fn random_normal(shape: &Shape, seed: u64, dtype: DType, _: &CpuDevice) -> Result<T> {
        let mut data = vec![0.0f32; shape.num_elements()?];
        data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| fill_normal(seed, (i * CHUNK) as u64, chunk));
        Ok(CpuTensor::store(data, shape.clone(), dtype))
    }
}

impl ArithOps for CpuBackend {
    fn binary(op: BinaryOp, a: &T, b: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("binary", a, b)?;
        let out_shape = Shape::broadcast("binary", &a.shape, &b.shape)?;
        let data = elementwise::binary(op, &a.values(), &a.shape, &b.values(), &b.shape, &out_shape)?;
        Ok(CpuTensor::store(data, out_shape, dtype))
    }
    fn affine(t: &T, scale: f32, shift: f32) -> Result<T> {
        Ok(CpuTensor::store(elementwise::map(&t.values(), |v| scale * v + shift), t.shape.clone(), t.dtype()))
    }
    fn unary(op: UnaryOp, t: &T) -> Result<T> {
        Ok(CpuTensor::store(elementwise::unary(op, &t.values()), t.shape.clone(), t.dtype()))
    }
    fn unary_backward(op: UnaryOp, x: &T, grad: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("unary_backward", x, grad)?;
        same_shape("unary_backward", x, grad)?;
        Ok(CpuTensor::store(elementwise::unary_backward(op, &x.values(), &grad.values()), x.shape.clone(), dtype))
    }
    fn axpby(a: f32, x: &T, b: f32, y: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("axpby", x, y)?;
        same_shape("axpby", x, y)?;
        Ok(CpuTensor::store(
            elementwise::zip_map(&x.values(), &y.values(), |u, v| a * u + b * v),
            x.shape.clone(),
            dtype,
        ))
    }
}

impl ReduceOps for CpuBackend {
    fn sum(t: &T) -> Result<T> {
        Ok(CpuTensor::store(vec![reduce::sum(&t.values()) as f32], Shape::scalar(), t.dtype()))
    }
    fn sum_to_shape(t: &T, shape: &Shape) -> Result<T> {
        Ok(CpuTensor::store(reduce::sum_to_shape(&t.values(), &t.shape, shape)?, shape.clone(), t.dtype()))
    }
    fn softmax_last(t: &T) -> Result<T> {
        let d = last_dim("softmax_last", &t.shape)?;
        Ok(CpuTensor::store(reduce::softmax_last(&t.values(), d), t.shape.clone(), t.dtype()))
    }
    fn softmax_last_backward(y: &T, grad: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("softmax_last_backward", y, grad)?;
        same_shape("softmax_last_backward", y, grad)?;
        let d = last_dim("softmax_last_backward", &y.shape)?;
        Ok(CpuTensor::store(reduce::softmax_last_backward(&y.values(), &grad.values(), d), y.shape.clone(), dtype))
    }
    fn sum_squares(t: &T) -> Result<T> {
        let v = t.values();
        let partials: Vec<f64> = v
            .par_chunks(CHUNK)
            .map(|c| crate::simd::vectorised(|| crate::sums::sum_map(c, |x| (x as f64) * (x as f64))))
            .collect();
        Ok(CpuTensor::store(vec![partials.iter().sum::<f64>() as f32], Shape::scalar(), t.dtype()))
    }
}

fn last_dim(op: &'static str, shape: &Shape) -> Result<usize> {
    shape.num_elements()?;
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(Error::Empty { op }),
    }
}

impl MatmulOps for CpuBackend {
    fn matmul(a: &T, b: &T, t: Transpose) -> Result<T> {
        let dtype = Self::expect_same_dtype("matmul", a, b)?;
        let g = MatmulGeometry::new("matmul", &a.shape, &b.shape, t)?;
        let (m, k, n) = (g.m, g.k, g.n);
        let (av, bv) = (a.values(), b.values());
        let mut out = vec![0.0f32; g.batch * m * n];
        let view_a = |i: usize| {
            let s = &av[i * m * k..(i + 1) * m * k];
            if t.a { MatRef::transposed(s, m, k) } else { MatRef::row_major(s, m, k) }
        };
        let view_b = |i: usize| {
            let s = &bv[i * k * n..(i + 1) * k * n];
            if t.b { MatRef::transposed(s, k, n) } else { MatRef::row_major(s, k, n) }
        };
        if g.batch >= rayon::current_num_threads() {
            out.par_chunks_mut((m * n).max(1))
                .enumerate()
                .for_each(|(i, o)| gemm_into(o, false, view_a(i), view_b(i), false));
        } else {
            for (i, o) in out.chunks_mut((m * n).max(1)).enumerate().take(g.batch) {
                gemm_into(o, false, view_a(i), view_b(i), true);
            }
        }
        Ok(CpuTensor::store(out, g.output_shape(), dtype))
    }
}

impl ConvOps for CpuBackend {
    fn conv2d(x: &T, weight: &T, bias: Option<&T>, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d", x, weight)?;
        let g = Conv2dGeometry::new("conv2d", &x.shape, &weight.shape, params)?;
        let bias_values = match bias {
            Some(b) => {
                Self::expect_same_dtype("conv2d", x, b)?;
                Shape::new([g.c_out]).expect_eq("conv2d", &b.shape)?;
                Some(b.values())
            }
            None => None,
        };
        let y = conv::conv2d(&g, &x.values(), &weight.values(), bias_values.as_deref());
        Ok(CpuTensor::store(y, g.output_shape(), dtype))
    }
    fn conv2d_backward_data(grad_out: &T, weight: &T, input_shape: &Shape, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d_backward_data", grad_out, weight)?;
        let g = Conv2dGeometry::new("conv2d_backward_data", input_shape, &weight.shape, params)?;
        g.output_shape().expect_eq("conv2d_backward_data", &grad_out.shape)?;
        let dx = conv::conv2d_backward_data(&g, &grad_out.values(), &weight.values());
        Ok(CpuTensor::store(dx, input_shape.clone(), dtype))
    }
    fn conv2d_backward_weight(x: &T, grad_out: &T, weight_shape: &Shape, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d_backward_weight", x, grad_out)?;
        let g = Conv2dGeometry::new("conv2d_backward_weight", &x.shape, weight_shape, params)?;
        g.output_shape().expect_eq("conv2d_backward_weight", &grad_out.shape)?;
        let dw = conv::conv2d_backward_weight(&g, &x.values(), &grad_out.values());
        Ok(CpuTensor::store(dw, weight_shape.clone(), dtype))
    }
}

impl NormOps for CpuBackend {
    fn group_norm(x: &T, gamma: &T, beta: &T, params: GroupNormParams) -> Result<GroupNormOutput<T>> {
        group_norm_with("group_norm", (x, gamma, beta), params, norm::group_norm)
    }
    fn group_norm_backward(
        x: &T,
        gamma: &T,
        stats: &GroupNormOutput<T>,
        grad_out: &T,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<T>> {
        group_norm_backward_with("group_norm_backward", (x, gamma, None), stats, grad_out, params)
    }
    fn group_norm_silu(x: &T, gamma: &T, beta: &T, params: GroupNormParams) -> Result<GroupNormOutput<T>> {
        group_norm_with("group_norm_silu", (x, gamma, beta), params, norm::group_norm_silu)
    }
    fn group_norm_silu_backward(
        x: &T,
        gamma: &T,
        beta: &T,
        stats: &GroupNormOutput<T>,
        grad_out: &T,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<T>> {
        group_norm_backward_with("group_norm_silu_backward", (x, gamma, Some(beta)), stats, grad_out, params)
    }
}

/// A group-norm backward with its checks. With `silu_beta` (the fused pair's β), the SiLU's
/// derivative is applied first, at the pre-activation recomputed from the statistics and β.
fn group_norm_backward_with(
    op: &'static str,
    (x, gamma, silu_beta): (&T, &T, Option<&T>),
    stats: &GroupNormOutput<T>,
    grad_out: &T,
    params: GroupNormParams,
) -> Result<GroupNormGrads<T>> {
    let dtype = CpuBackend::expect_same_dtype(op, x, gamma)?;
    if let Some(beta) = silu_beta {
        CpuBackend::expect_same_dtype(op, x, beta)?;
    }
    CpuBackend::expect_same_dtype(op, x, grad_out)?;
    same_shape(op, x, grad_out)?;
    let beta_shape = silu_beta.map_or(&gamma.shape, |b| &b.shape);
    let g = GroupNormGeometry::new(op, &x.shape, &gamma.shape, beta_shape, params)?;
    g.stats_shape().expect_eq(op, &stats.mean.shape)?;
    g.stats_shape().expect_eq(op, &stats.rstd.shape)?;
    let (xv, gv, mean, rstd, gout) =
        (x.values(), gamma.values(), stats.mean.values(), stats.rstd.values(), grad_out.values());
    let dz = match silu_beta {
        Some(beta) => Cow::Owned(norm::silu_grad_before_norm(&g, &xv, &gv, &beta.values(), (&mean, &rstd), &gout)),
        None => gout,
    };
    let (dx, dg, db) = norm::group_norm_backward(&g, &xv, &gv, &mean, &rstd, &dz);
    Ok(GroupNormGrads {
        input: CpuTensor::store(dx, x.shape.clone(), dtype),
        gamma: CpuTensor::store(dg, gamma.shape.clone(), dtype),
        beta: CpuTensor::store(db, gamma.shape.clone(), dtype),
    })
}

/// `(geometry, x, γ, β, ε) → (output, mean, rstd)`: `norm::group_norm` or `norm::group_norm_silu`.
type GroupNormKernel = fn(&GroupNormGeometry, &[f32], &[f32], &[f32], f32) -> (Vec<f32>, Vec<f32>, Vec<f32>);

/// A group-norm forward with its checks: the output in `x`'s dtype, the statistics in f32.
fn group_norm_with(
    op: &'static str,
    (x, gamma, beta): (&T, &T, &T),
    params: GroupNormParams,
    kernel: GroupNormKernel,
) -> Result<GroupNormOutput<T>> {
    let dtype = CpuBackend::expect_same_dtype(op, x, gamma)?;
    CpuBackend::expect_same_dtype(op, x, beta)?;
    let g = GroupNormGeometry::new(op, &x.shape, &gamma.shape, &beta.shape, params)?;
    let (y, mean, rstd) = kernel(&g, &x.values(), &gamma.values(), &beta.values(), params.eps);
    Ok(GroupNormOutput {
        output: CpuTensor::store(y, x.shape.clone(), dtype),
        mean: CpuTensor::store(mean, g.stats_shape(), DType::F32),
        rstd: CpuTensor::store(rstd, g.stats_shape(), DType::F32),
    })
}

impl LayoutOps for CpuBackend {
    fn permute(x: &T, axes: &[usize]) -> Result<T> {
        let out_shape = Self::permute_check("permute", x, axes)?;
        let (dims, strides) = lisa_core::backend::geometry::permute_strides(&x.shape, axes);
        Ok(CpuTensor::store(layout::permute(&x.values(), &dims, &strides), out_shape, x.dtype()))
    }
    fn upsample_nearest(x: &T, factor: usize) -> Result<T> {
        let out_shape = upsample_output_shape("upsample_nearest", &x.shape, factor)?;
        let d = x.shape.dims();
        Ok(CpuTensor::store(layout::upsample_nearest(&x.values(), d[2], d[3], factor), out_shape, x.dtype()))
    }
    fn upsample_nearest_backward(grad_out: &T, factor: usize) -> Result<T> {
        const OP: &str = "upsample_nearest_backward";
        let out_shape = upsample_backward_input_shape(OP, &grad_out.shape, factor)?;
        let d = grad_out.shape.dims();
        Ok(CpuTensor::store(
            layout::upsample_nearest_backward(&grad_out.values(), d[2], d[3], factor),
            out_shape,
            grad_out.dtype(),
        ))
    }
    fn concat_channels(parts: &[&T]) -> Result<T> {
        let (out_shape, dtype) = Self::concat_channels_check("concat_channels", parts)?;
        let batch = out_shape.dims()[0];
        let values: Vec<_> = parts.iter().map(|p| p.values()).collect();
        let slices: Vec<&[f32]> = values.iter().map(|v| &v[..]).collect();
        let per_sample: Vec<usize> = parts.iter().map(|p| p.len().checked_div(batch).unwrap_or(0)).collect();
        Ok(CpuTensor::store(layout::concat_channels(&slices, &per_sample, batch), out_shape, dtype))
    }
    fn slice_channels(x: &T, start: usize, len: usize) -> Result<T> {
        let out_shape = slice_channels_shape("slice_channels", &x.shape, start, len)?;
        let (n, c) = (x.shape.dims()[0], x.shape.dims()[1]);
        let inner = Shape::new(&x.shape.dims()[2..]).num_elements()?;
        let v = x.values();
        let mut out = Vec::with_capacity(n * len * inner);
        for b in 0..n {
            let base = (b * c + start) * inner;
            out.extend_from_slice(&v[base..base + len * inner]);
        }
        Ok(CpuTensor::store(out, out_shape, x.dtype()))
    }
}

impl FusedOps for CpuBackend {
    fn mse_loss(pred: &T, target: &T) -> Result<(f32, T)> {
        let dtype = Self::expect_same_dtype("mse_loss", pred, target)?;
        same_shape("mse_loss", pred, target)?;
        if pred.is_empty() {
            return Err(Error::Empty { op: "mse_loss" });
        }
        let (loss, grad) = fused::mse_loss(&pred.values(), &target.values());
        if !loss.is_finite() {
            return Err(Error::NonFinite { op: "mse_loss" });
        }
        Ok((loss as f32, CpuTensor::store(grad, pred.shape.clone(), dtype)))
    }

    fn lisa_loss(
        config: &LisaConfig,
        terms: &[SampleTerms<f32>],
        decoded: &T,
        y: &T,
        prior: &T,
    ) -> Result<(LisaLoss<f32>, T)> {
        const OP: &str = "lisa_loss";
        let dtype = Self::expect_same_dtype(OP, decoded, y)?;
        Self::expect_same_dtype(OP, decoded, prior)?;
        same_shape(OP, decoded, y)?;
        same_shape(OP, decoded, prior)?;
        let mut grad = vec![0.0f32; decoded.len()];
        let loss = lisa_loss_fused(config, terms, &decoded.values(), &y.values(), &prior.values(), &mut grad)?;
        Ok((loss, CpuTensor::store(grad, decoded.shape.clone(), dtype)))
    }

    fn adamw_update(param: &mut T, m: &mut T, v: &mut T, grad: &T, hp: &AdamWParams) -> Result<()> {
        const OP: &str = "adamw_update";
        for t in [&*m, &*v, grad] {
            same_shape(OP, param, t)?;
        }
        hp.validate()?;
        let shape = param.shape.clone();
        let dtypes = (param.dtype(), m.dtype(), v.dtype());
        let take =
            |t: &mut T| std::mem::replace(t, CpuTensor::store(Vec::new(), Shape::new([0]), DType::F32)).into_values();
        let (mut p, mut mm, mut vv) = (take(param), take(m), take(v));
        let result = fused::adamw(&mut p, &mut mm, &mut vv, &grad.values(), hp);
        *param = CpuTensor::store(p, shape.clone(), dtypes.0);
        *m = CpuTensor::store(mm, shape.clone(), dtypes.1);
        *v = CpuTensor::store(vv, shape, dtypes.2);
        result
    }
}

/// Fused, tiled attention (`src/attention.rs`): the forward keeps the row log-sum-exp, the
/// backward recomputes the probabilities tile by tile.
impl AttentionOps for CpuBackend {
    fn attention_forward(q: &T, k: &T, v: &T, params: AttentionParams) -> Result<AttentionForward<T>> {
        const OP: &str = "attention";
        let dims = AttentionDims::new(OP, &q.shape, &k.shape, &v.shape, params)?;
        let dtype = Self::expect_same_dtype(OP, q, k)?;
        Self::expect_same_dtype(OP, q, v)?;
        let (out, lse) = attention::forward(&q.values(), &k.values(), &v.values(), dims, params);
        Ok(AttentionForward {
            out: CpuTensor::store(out, dims.out_shape(), dtype),
            lse: Some(CpuTensor::store(lse, dims.lse_shape(), DType::F32)),
        })
    }

    fn attention_backward(
        q: &T,
        k: &T,
        v: &T,
        forward: &AttentionForward<T>,
        grad_out: &T,
        params: AttentionParams,
    ) -> Result<AttentionGrads<T>> {
        const OP: &str = "attention_backward";
        let dims = AttentionDims::new(OP, &q.shape, &k.shape, &v.shape, params)?;
        let dtype = Self::expect_same_dtype(OP, q, k)?;
        Self::expect_same_dtype(OP, q, v)?;
        Self::expect_same_dtype(OP, q, grad_out)?;
        let lse = match &forward.lse {
            Some(lse) => lse.clone(),
            // A forward from another implementation: its statistics, recomputed once.
            None => Self::attention_forward(q, k, v, params)?.lse.ok_or(Error::Empty { op: OP })?,
        };
        dims.check_backward(OP, &forward.out.shape, &lse.shape, &grad_out.shape)?;
        let (dq, dk, dv) = attention::backward(
            &q.values(),
            &k.values(),
            &v.values(),
            &forward.out.values(),
            &lse.values(),
            &grad_out.values(),
            dims,
            params,
        );
        Ok(AttentionGrads {
            q: CpuTensor::store(dq, q.shape.clone(), dtype),
            k: CpuTensor::store(dk, k.shape.clone(), dtype),
            v: CpuTensor::store(dv, v.shape.clone(), dtype),
        })
    }
}

/// On the low-resolution input: four sub-pixel 2×2 kernels as one convolution (see
/// `upsample_conv.rs`), 16 instead of 36 taps per 2×2 output block.
impl UpsampleConvOps for CpuBackend {
    fn upsample_conv2d(x: &T, weight: &T, bias: Option<&T>) -> Result<T> {
        const OP: &str = "upsample_conv2d";
        let dtype = Self::expect_same_dtype(OP, x, weight)?;
        let g4 = upsample_conv_geometry(OP, &x.shape, &weight.shape)?;
        let bias_values = match bias {
            Some(b) => {
                Self::expect_same_dtype(OP, x, b)?;
                Shape::new([g4.c_out / 4]).expect_eq(OP, &b.shape)?;
                Some(b.values())
            }
            None => None,
        };
        let y = upsample_conv::forward(&g4, &x.values(), &weight.values(), bias_values.as_deref());
        Ok(CpuTensor::store(y, upsample_conv_output(OP, &g4)?, dtype))
    }
    fn upsample_conv2d_backward_data(grad_out: &T, weight: &T, input_shape: &Shape) -> Result<T> {
        const OP: &str = "upsample_conv2d_backward_data";
        let dtype = Self::expect_same_dtype(OP, grad_out, weight)?;
        let g4 = upsample_conv_geometry(OP, input_shape, &weight.shape)?;
        upsample_conv_output(OP, &g4)?.expect_eq(OP, &grad_out.shape)?;
        let dx = upsample_conv::backward_data(&g4, &grad_out.values(), &weight.values());
        Ok(CpuTensor::store(dx, input_shape.clone(), dtype))
    }
    fn upsample_conv2d_backward_weight(x: &T, grad_out: &T, weight_shape: &Shape) -> Result<T> {
        const OP: &str = "upsample_conv2d_backward_weight";
        let dtype = Self::expect_same_dtype(OP, x, grad_out)?;
        let g4 = upsample_conv_geometry(OP, &x.shape, weight_shape)?;
        upsample_conv_output(OP, &g4)?.expect_eq(OP, &grad_out.shape)?;
        let dw = upsample_conv::backward_weight(&g4, &x.values(), &grad_out.values());
        Ok(CpuTensor::store(dw, weight_shape.clone(), dtype))
    }
}

/// The four phases' 2×2 convolution for `x [n, c_in, h, w]` and `w [c_out, c_in, 3, 3]`,
/// refusing a kernel that is not 3×3 or whose input channels differ from `x`'s.
fn upsample_conv_geometry(op: &'static str, x: &Shape, w: &Shape) -> Result<Conv2dGeometry> {
    check_upsample_conv_kernel(op, w)?;
    x.expect_rank(op, 4)?;
    let (c_out, c_in) = (w.dims()[0], w.dims()[1]);
    if x.dims()[1] != c_in {
        return Err(Error::invalid(op, format!("input has {} channels, the kernel {c_in}", x.dims()[1])));
    }
    upsample_conv::phase_geometry(op, x, c_out)
}

/// `[n, c_out, 2h, 2w]` for the phases' geometry.
fn upsample_conv_output(op: &'static str, g4: &Conv2dGeometry) -> Result<Shape> {
    upsampled_shape(op, &Shape::new([g4.batch, g4.c_out / 4, g4.h, g4.w]))
}
