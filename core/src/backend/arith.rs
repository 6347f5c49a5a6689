use super::TensorOps;
use crate::Result;

/// Elementwise binary operations (numpy broadcasting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a − b`
    Sub,
    /// `a · b`
    Mul,
    /// `a / b`
    Div,
}

impl BinaryOp {
    /// The scalar function.
    #[inline]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

/// Elementwise unary functions, each with its derivative for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `silu(x) = x·σ(x)`, `silu'(x) = σ(x)·(1 + x·(1 − σ(x)))`.
    Silu,
    /// `exp(x)`, derivative `exp(x)`.
    Exp,
    /// `x²`, derivative `2x`.
    Square,
    /// `√x`, derivative `1/(2√x)`.
    Sqrt,
}

impl UnaryOp {
    /// `f(x)`.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        use num_traits::Float;
        match self {
            UnaryOp::Silu => x / (1.0 + Float::exp(-x)),
            UnaryOp::Exp => Float::exp(x),
            UnaryOp::Square => x * x,
            UnaryOp::Sqrt => Float::sqrt(x),
        }
    }

    /// `f'(x)`.
    #[inline]
    pub fn derivative(self, x: f32) -> f32 {
        use num_traits::Float;
        match self {
            UnaryOp::Silu => {
                let s = 1.0 / (1.0 + Float::exp(-x));
                s * (1.0 + x * (1.0 - s))
            }
            UnaryOp::Exp => Float::exp(x),
            UnaryOp::Square => 2.0 * x,
            UnaryOp::Sqrt => 0.5 / Float::sqrt(x),
        }
    }
}

/// Elementwise arithmetic and activations.
pub trait ArithOps: TensorOps {
    /// `op(a, b)` with numpy broadcasting; dtypes must match.
    fn binary(op: BinaryOp, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `scale·t + shift`.
    fn affine(t: &Self::Tensor, scale: f32, shift: f32) -> Result<Self::Tensor>;

    /// `f(t)` elementwise.
    fn unary(op: UnaryOp, t: &Self::Tensor) -> Result<Self::Tensor>;

    /// Backward of [`ArithOps::unary`]: `grad · f'(x)` (shapes equal).
    fn unary_backward(op: UnaryOp, x: &Self::Tensor, grad: &Self::Tensor) -> Result<Self::Tensor>;

    /// *Default*: `a + b`.
    fn add(a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Self::binary(BinaryOp::Add, a, b)
    }
    /// *Default*: `a − b`.
    fn sub(a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Self::binary(BinaryOp::Sub, a, b)
    }
    /// *Default*: `a · b`.
    fn mul(a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Self::binary(BinaryOp::Mul, a, b)
    }
    /// *Default*: `a / b`.
    fn div(a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        Self::binary(BinaryOp::Div, a, b)
    }
    /// *Default*: `s·t`.
    fn scale(t: &Self::Tensor, s: f32) -> Result<Self::Tensor> {
        Self::affine(t, s, 0.0)
    }
    /// *Default*: `a·x + b·y` (same shapes), the axpby of BLAS.
    fn axpby(a: f32, x: &Self::Tensor, b: f32, y: &Self::Tensor) -> Result<Self::Tensor> {
        Self::add(&Self::scale(x, a)?, &Self::scale(y, b)?)
    }
    /// *Default*: `silu(t)`.
    fn silu(t: &Self::Tensor) -> Result<Self::Tensor> {
        Self::unary(UnaryOp::Silu, t)
    }
    /// *Default*: `grad · silu'(x)`.
    fn silu_backward(x: &Self::Tensor, grad: &Self::Tensor) -> Result<Self::Tensor> {
        Self::unary_backward(UnaryOp::Silu, x, grad)
    }
}
