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
    /// `gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2))` (torch's default GELU),
    /// `gelu'(x) = Φ(x) + x·φ(x)` with `φ` the standard normal density.
    Gelu,
    /// The tanh approximation `½x(1 + tanh(u))`, `u = √(2/π)(x + 0.044715x³)`
    /// (torch's `approximate="tanh"`), derivative `½(1 + tanh u) + ½x(1 − tanh²u)·u'`.
    GeluTanh,
    /// `quick_gelu(x) = x·σ(1.702x)` (CLIP), derivative `σ(a)(1 + a(1 − σ(a)))`, `a = 1.702x`.
    QuickGelu,
}

/// `√(2/π)`, the tanh-GELU's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The tanh-GELU's cubic coefficient.
const GELU_TANH_CUBIC: f32 = 0.044_715;
/// The quick-GELU's sigmoid slope.
const QUICK_GELU_SLOPE: f32 = 1.702;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + num_traits::Float::exp(-x))
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
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2)),
            UnaryOp::GeluTanh => {
                let u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x);
                0.5 * x * (1.0 + Float::tanh(u))
            }
            UnaryOp::QuickGelu => x * sigmoid(QUICK_GELU_SLOPE * x),
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
            UnaryOp::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2));
                let pdf = Float::exp(-0.5 * x * x)
                    * (0.5 * core::f32::consts::FRAC_2_SQRT_PI * core::f32::consts::FRAC_1_SQRT_2);
                cdf + x * pdf
            }
            UnaryOp::GeluTanh => {
                let u = SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x * x * x);
                let th = Float::tanh(u);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_CUBIC * x * x);
                0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
            }
            UnaryOp::QuickGelu => {
                let a = QUICK_GELU_SLOPE * x;
                let s = sigmoid(a);
                s * (1.0 + a * (1.0 - s))
            }
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
