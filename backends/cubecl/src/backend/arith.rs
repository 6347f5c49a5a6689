//! Elementwise arithmetic.

use cubecl::prelude::*;
use lisa_core::Result;
use lisa_core::backend::{ArithOps, BinaryOp, Shape, TensorOps, UnaryOp};

use super::{CubeBackend, T, alloc, arg, check_dtype, table};
use crate::kernels::elementwise as k;
use crate::launch::{grid_1d, vector_width, with_float};

fn binary_code(op: BinaryOp) -> u32 {
    match op {
        BinaryOp::Add => k::ADD,
        BinaryOp::Sub => k::SUB,
        BinaryOp::Mul => k::MUL,
        BinaryOp::Div => k::DIV,
    }
}

fn unary_code(op: UnaryOp) -> u32 {
    match op {
        UnaryOp::Silu => k::SILU,
        UnaryOp::Exp => k::EXP,
        UnaryOp::Square => k::SQUARE,
        UnaryOp::Sqrt => k::SQRT,
        UnaryOp::Gelu => k::GELU,
        UnaryOp::GeluTanh => k::GELU_TANH,
        UnaryOp::QuickGelu => k::QUICK_GELU,
    }
}

impl<R: Runtime> ArithOps for CubeBackend<R> {
    fn binary(op: BinaryOp, a: &T<R>, b: &T<R>) -> Result<T<R>> {
        let dtype = Self::expect_same_dtype("binary", a, b)?;
        check_dtype("binary", &a.device, dtype)?;
        let out_shape = Shape::broadcast("binary", &a.shape, &b.shape)?;
        let out = alloc(&a.device, out_shape.clone(), dtype)?;
        if out.is_empty() {
            return Ok(out);
        }
        let client = &a.device.client;
        let code = binary_code(op);
        if a.shape == b.shape {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(dtype, F => k::binary_same::launch::<F, R>(client, count, dim, w, arg(a), arg(b), arg(&out), code));
        } else {
            let rank = out_shape.rank();
            let mut meta = out_shape.dims().to_vec();
            meta.extend(a.shape.broadcast_strides(&out_shape));
            meta.extend(b.shape.broadcast_strides(&out_shape));
            let meta = table(&a.device, &meta)?;
            let (count, dim) = grid_1d(out.len());
            with_float!(dtype, F => k::binary_broadcast::launch::<F, R>(
                client, count, dim, arg(a), arg(b), arg(&out), meta, rank as u32, code
            ));
        }
        Ok(out)
    }
    fn affine(t: &T<R>, scale: f32, shift: f32) -> Result<T<R>> {
        check_dtype("affine", &t.device, t.dtype)?;
        let out = alloc(&t.device, t.shape.clone(), t.dtype)?;
        if !out.is_empty() {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(t.dtype, F => k::affine::launch::<F, R>(
                &t.device.client, count, dim, w, arg(t), arg(&out), scale, shift
            ));
        }
        Ok(out)
    }
    fn unary(op: UnaryOp, t: &T<R>) -> Result<T<R>> {
        check_dtype("unary", &t.device, t.dtype)?;
        let out = alloc(&t.device, t.shape.clone(), t.dtype)?;
        if !out.is_empty() {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(t.dtype, F => k::unary::launch::<F, R>(
                &t.device.client, count, dim, w, arg(t), arg(&out), unary_code(op)
            ));
        }
        Ok(out)
    }
    fn unary_backward(op: UnaryOp, x: &T<R>, grad: &T<R>) -> Result<T<R>> {
        let dtype = Self::expect_same_dtype("unary_backward", x, grad)?;
        x.shape.expect_eq("unary_backward", &grad.shape)?;
        check_dtype("unary_backward", &x.device, dtype)?;
        let out = alloc(&x.device, x.shape.clone(), dtype)?;
        if !out.is_empty() {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(dtype, F => k::unary_backward::launch::<F, R>(
                &x.device.client, count, dim, w, arg(x), arg(grad), arg(&out), unary_code(op)
            ));
        }
        Ok(out)
    }
    fn axpby(a: f32, x: &T<R>, b: f32, y: &T<R>) -> Result<T<R>> {
        let dtype = Self::expect_same_dtype("axpby", x, y)?;
        x.shape.expect_eq("axpby", &y.shape)?;
        check_dtype("axpby", &x.device, dtype)?;
        let out = alloc(&x.device, x.shape.clone(), dtype)?;
        if !out.is_empty() {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(dtype, F => k::axpby::launch::<F, R>(
                &x.device.client, count, dim, w, arg(x), arg(y), arg(&out), a, b
            ));
        }
        Ok(out)
    }
}
