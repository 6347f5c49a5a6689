//! Nearest upsampling and channel concat/slice.

use cubecl::prelude::*;
use lisa_core::Result;
use lisa_core::backend::LayoutOps;
use lisa_core::backend::geometry::{slice_channels_shape, upsample_backward_input_shape, upsample_output_shape};

use super::{CubeBackend, T, alloc, arg, check_dtype, table, u32_of};
use crate::kernels::layout as k;
use crate::launch::{grid_1d, with_float};

/// Copies channels `[src_start, src_start + len)` of every sample of `src` to channels
/// `[dst_start, …)` of `dst`.
fn copy_channels<R: Runtime>(src: &T<R>, src_start: usize, len: usize, dst: &T<R>, dst_start: usize) -> Result<()> {
    const OP: &str = "copy_channels";
    let batch = src.shape.dims()[0];
    let inner: usize = src.shape.dims()[2..].iter().product();
    let n = batch * len * inner;
    if n == 0 {
        return Ok(());
    }
    let (count, dim) = grid_1d(n);
    let u = |v: usize| u32_of(OP, v);
    with_float!(src.dtype, F => k::copy_channels::launch::<F, R>(
        &src.device.client, count, dim, arg(src), arg(dst),
        u(batch)?, u(len)?, u(inner)?, u(src.shape.dims()[1])?, u(src_start)?, u(dst.shape.dims()[1])?, u(dst_start)?
    ));
    Ok(())
}

impl<R: Runtime> LayoutOps for CubeBackend<R> {
    fn permute(x: &T<R>, axes: &[usize]) -> Result<T<R>> {
        const OP: &str = "permute";
        let out_shape = Self::permute_check(OP, x, axes)?;
        check_dtype(OP, &x.device, x.dtype)?;
        let out = alloc(&x.device, out_shape, x.dtype)?;
        if !out.is_empty() {
            let (dims, strides) = lisa_core::backend::geometry::permute_strides(&x.shape, axes);
            let meta = table(&x.device, &[dims, strides].concat())?;
            let (count, dim) = grid_1d(out.len());
            with_float!(x.dtype, F => k::permute::launch::<F, R>(
                &x.device.client, count, dim, arg(x), arg(&out), meta, u32_of(OP, axes.len())?
            ));
        }
        Ok(out)
    }
    fn upsample_nearest(x: &T<R>, factor: usize) -> Result<T<R>> {
        const OP: &str = "upsample_nearest";
        let out_shape = upsample_output_shape(OP, &x.shape, factor)?;
        check_dtype(OP, &x.device, x.dtype)?;
        let out = alloc(&x.device, out_shape, x.dtype)?;
        if !out.is_empty() {
            let d = x.shape.dims();
            let (count, dim) = grid_1d(out.len());
            with_float!(x.dtype, F => k::upsample_nearest::launch::<F, R>(
                &x.device.client, count, dim, arg(x), arg(&out), u32_of(OP, d[2])?, u32_of(OP, d[3])?, u32_of(OP, factor)?
            ));
        }
        Ok(out)
    }
    fn upsample_nearest_backward(grad_out: &T<R>, factor: usize) -> Result<T<R>> {
        const OP: &str = "upsample_nearest_backward";
        let in_shape = upsample_backward_input_shape(OP, &grad_out.shape, factor)?;
        check_dtype(OP, &grad_out.device, grad_out.dtype)?;
        let (h, w) = (in_shape.dims()[2], in_shape.dims()[3]);
        let out = alloc(&grad_out.device, in_shape, grad_out.dtype)?;
        if !out.is_empty() {
            let (count, dim) = grid_1d(out.len());
            with_float!(grad_out.dtype, F => k::upsample_nearest_backward::launch::<F, R>(
                &grad_out.device.client, count, dim, arg(grad_out), arg(&out), u32_of(OP, h)?, u32_of(OP, w)?, u32_of(OP, factor)?
            ));
        }
        Ok(out)
    }
    fn concat_channels(parts: &[&T<R>]) -> Result<T<R>> {
        const OP: &str = "concat_channels";
        let (out_shape, _) = Self::concat_channels_check(OP, parts)?;
        let first = parts[0];
        check_dtype(OP, &first.device, first.dtype)?;
        let out = alloc(&first.device, out_shape, first.dtype)?;
        let mut start = 0;
        for p in parts {
            let c = p.shape.dims()[1];
            copy_channels(p, 0, c, &out, start)?;
            start += c;
        }
        Ok(out)
    }
    fn slice_channels(x: &T<R>, start: usize, len: usize) -> Result<T<R>> {
        const OP: &str = "slice_channels";
        let out_shape = slice_channels_shape(OP, &x.shape, start, len)?;
        check_dtype(OP, &x.device, x.dtype)?;
        let out = alloc(&x.device, out_shape, x.dtype)?;
        copy_channels(x, start, len, &out, 0)?;
        Ok(out)
    }
}
