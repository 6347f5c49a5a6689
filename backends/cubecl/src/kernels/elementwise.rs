//! Elementwise maps: vectorised (`N` lanes) when operands share a shape, a strided
//! broadcasting kernel otherwise.

use cubecl::prelude::*;

/// Op codes of [`lisa_core::backend::BinaryOp`] (comptime: one kernel per op).
pub const ADD: u32 = 0;
/// `a − b`.
pub const SUB: u32 = 1;
/// `a · b`.
pub const MUL: u32 = 2;
/// `a / b`.
pub const DIV: u32 = 3;

/// Op codes of [`lisa_core::backend::UnaryOp`].
pub const SILU: u32 = 0;
/// `exp`.
pub const EXP: u32 = 1;
/// `x²`.
pub const SQUARE: u32 = 2;
/// `√x`.
pub const SQRT: u32 = 3;
/// `½x(1 + erf(x/√2))`.
pub const GELU: u32 = 4;
/// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.
pub const GELU_TANH: u32 = 5;
/// `x·σ(1.702x)`.
pub const QUICK_GELU: u32 = 6;

/// `√(2/π)`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// `1/√2`.
const FRAC_1_SQRT_2: f32 = core::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[cube]
fn apply_binary<N: Size>(x: Vector<f32, N>, y: Vector<f32, N>, #[comptime] op: u32) -> Vector<f32, N> {
    let mut r = x + y;
    if comptime![op == SUB] {
        r = x - y;
    } else if comptime![op == MUL] {
        r = x * y;
    } else if comptime![op == DIV] {
        r = x / y;
    }
    r
}

/// `out = op(a, b)`, all of one shape, `N` lanes per thread.
#[cube(launch)]
pub fn binary_same<F: Float, N: Size>(
    a: &Array<Vector<F, N>>,
    b: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    #[comptime] op: u32,
) {
    if ABSOLUTE_POS < out.len() {
        let x = Vector::<f32, N>::cast_from(a[ABSOLUTE_POS]);
        let y = Vector::<f32, N>::cast_from(b[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(apply_binary::<N>(x, y, op));
    }
}

/// `out[i] = op(a[ia(i)], b[ib(i)])` with numpy broadcasting. `meta` holds, for rank `r`:
/// the output dims, then `a`'s and `b`'s broadcast strides (0 on broadcast dims).
#[cube(launch)]
pub fn binary_broadcast<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    out: &mut Array<F>,
    meta: &Array<u32>,
    rank: u32,
    #[comptime] op: u32,
) {
    if ABSOLUTE_POS < out.len() {
        let r = rank as usize;
        let mut rem = ABSOLUTE_POS;
        let mut ia = 0usize;
        let mut ib = 0usize;
        for k in 0..r {
            let d = r - 1 - k;
            let size = meta[d] as usize;
            let coord = rem % size;
            rem /= size;
            ia += coord * meta[r + d] as usize;
            ib += coord * meta[2 * r + d] as usize;
        }
        let x = f32::cast_from(a[ia]);
        let y = f32::cast_from(b[ib]);
        let mut v = x + y;
        if comptime![op == SUB] {
            v = x - y;
        } else if comptime![op == MUL] {
            v = x * y;
        } else if comptime![op == DIV] {
            v = x / y;
        }
        out[ABSOLUTE_POS] = F::cast_from(v);
    }
}

/// `out = scale·x + shift`.
#[cube(launch)]
pub fn affine<F: Float, N: Size>(x: &Array<Vector<F, N>>, out: &mut Array<Vector<F, N>>, scale: f32, shift: f32) {
    if ABSOLUTE_POS < out.len() {
        let v = Vector::<f32, N>::cast_from(x[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(v * Vector::new(scale) + Vector::new(shift));
    }
}

/// `out = a·x + b·y` (same shapes).
#[cube(launch)]
pub fn axpby<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    a: f32,
    b: f32,
) {
    if ABSOLUTE_POS < out.len() {
        let u = Vector::<f32, N>::cast_from(x[ABSOLUTE_POS]);
        let v = Vector::<f32, N>::cast_from(y[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(u * Vector::new(a) + v * Vector::new(b));
    }
}

#[cube]
fn sigmoid<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    // `0 - x`, not `-x`: cubecl's CUDA code generator writes a unary minus on a vector type
    // (`float_4`), which has no such operator in CUDA C++ and fails to compile.
    Vector::new(1.0) / (Vector::new(1.0) + Vector::exp(Vector::new(0.0) - x))
}

/// `out = f(x)`.
#[cube(launch)]
pub fn unary<F: Float, N: Size>(x: &Array<Vector<F, N>>, out: &mut Array<Vector<F, N>>, #[comptime] op: u32) {
    if ABSOLUTE_POS < out.len() {
        let v = Vector::<f32, N>::cast_from(x[ABSOLUTE_POS]);
        let mut r = v * v;
        if comptime![op == SILU] {
            r = v * sigmoid::<N>(v);
        } else if comptime![op == EXP] {
            r = Vector::exp(v);
        } else if comptime![op == SQRT] {
            r = Vector::sqrt(v);
        } else if comptime![op == GELU] {
            r = Vector::new(0.5) * v * (Vector::new(1.0) + Vector::erf(v * Vector::new(FRAC_1_SQRT_2)));
        } else if comptime![op == GELU_TANH] {
            let u = Vector::new(SQRT_2_OVER_PI) * (v + Vector::new(0.044715) * v * v * v);
            r = Vector::new(0.5) * v * (Vector::new(1.0) + Vector::tanh(u));
        } else if comptime![op == QUICK_GELU] {
            r = v * sigmoid::<N>(v * Vector::new(1.702));
        }
        out[ABSOLUTE_POS] = Vector::cast_from(r);
    }
}

/// `out = grad · f'(x)`.
#[cube(launch)]
pub fn unary_backward<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    grad: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    #[comptime] op: u32,
) {
    if ABSOLUTE_POS < out.len() {
        let v = Vector::<f32, N>::cast_from(x[ABSOLUTE_POS]);
        let g = Vector::<f32, N>::cast_from(grad[ABSOLUTE_POS]);
        let mut d = v * Vector::new(2.0);
        if comptime![op == SILU] {
            let s = sigmoid::<N>(v);
            d = s * (Vector::new(1.0) + v * (Vector::new(1.0) - s));
        } else if comptime![op == EXP] {
            d = Vector::exp(v);
        } else if comptime![op == SQRT] {
            d = Vector::new(0.5) / Vector::sqrt(v);
        } else if comptime![op == GELU] {
            let cdf = Vector::new(0.5) * (Vector::new(1.0) + Vector::erf(v * Vector::new(FRAC_1_SQRT_2)));
            d = cdf + v * Vector::new(FRAC_1_SQRT_2PI) * Vector::exp(Vector::new(-0.5) * v * v);
        } else if comptime![op == GELU_TANH] {
            let u = Vector::new(SQRT_2_OVER_PI) * (v + Vector::new(0.044715) * v * v * v);
            let th = Vector::tanh(u);
            let du = Vector::new(SQRT_2_OVER_PI) * (Vector::new(1.0) + Vector::new(3.0 * 0.044715) * v * v);
            d = Vector::new(0.5) * (Vector::new(1.0) + th) + Vector::new(0.5) * v * (Vector::new(1.0) - th * th) * du;
        } else if comptime![op == QUICK_GELU] {
            let a = v * Vector::new(1.702);
            let s = sigmoid::<N>(a);
            d = s * (Vector::new(1.0) + a * (Vector::new(1.0) - s));
        }
        out[ABSOLUTE_POS] = Vector::cast_from(g * d);
    }
}

/// `out = x` converted from storage type `I` to `O` (round to nearest even). (Not named
/// `cast`: the kernel's generated module would shadow cubecl's `cast` module.)
#[cube(launch)]
pub fn convert<I: Float, O: Float, N: Size>(x: &Array<Vector<I, N>>, out: &mut Array<Vector<O, N>>) {
    if ABSOLUTE_POS < out.len() {
        let v = Vector::<f32, N>::cast_from(x[ABSOLUTE_POS]);
        out[ABSOLUTE_POS] = Vector::cast_from(v);
    }
}

/// `out = value` everywhere.
#[cube(launch)]
pub fn fill<F: Float, N: Size>(out: &mut Array<Vector<F, N>>, value: f32) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = Vector::cast_from(Vector::<f32, N>::new(value));
    }
}
