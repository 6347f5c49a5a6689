use lisa_core::backend::{Backend, BinaryOp, Conv2dParams, DType, GroupNormParams, Shape, Transpose, UnaryOp};

use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, Init, ParamId, ParamStore, Scope};

/// The shape and initialisation of a [`Conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel side `k`.
    pub kernel: usize,
    /// Zero padding on every side (`k/2`, "same" for odd kernels, by default).
    pub padding: usize,
    /// Stride (1).
    pub stride: usize,
    /// Zero weights (ControlNet zero convs, the LISA decoder's output conv) instead of
    /// LeCun-normal ones.
    pub zero_init: bool,
}

impl Conv2dConfig {
    /// A `kernel × kernel`, stride-1, LeCun-normal convolution.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Self { in_channels, out_channels, kernel, padding: kernel / 2, stride: 1, zero_init: false }
    }

    /// With `padding` zeros on every side.
    pub fn padding(self, padding: usize) -> Self {
        Self { padding, ..self }
    }

    /// With stride `stride`.
    pub fn stride(self, stride: usize) -> Self {
        Self { stride, ..self }
    }

    /// Zero-initialised.
    pub fn zero_init(self) -> Self {
        Self { zero_init: true, ..self }
    }
}

/// 2-D convolution `y = w ⋆ x + b`, `w [c_out, c_in, k, k]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// Weight `[c_out, c_in, k, k]`.
    pub weight: ParamId,
    /// Bias `[c_out]`.
    pub bias: ParamId,
    /// Stride and padding.
    pub params: Conv2dParams,
}

impl Conv2d {
    /// Parameters `weight` and `bias` (zero) under `at`.
    pub fn new<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, c: Conv2dConfig) -> Result<Self> {
        let at = at.into();
        let k = c.kernel;
        let init = if c.zero_init { Init::Zeros } else { Init::LecunNormal { fan_in: c.in_channels * k * k } };
        Ok(Self {
            weight: store.add(at.name("weight"), &[c.out_channels, c.in_channels, k, k], init)?,
            bias: store.add(at.name("bias"), &[c.out_channels], Init::Zeros)?,
            params: Conv2dParams { stride: [c.stride, c.stride], padding: [c.padding, c.padding] },
        })
    }

    /// `[n, c_in, h, w] → [n, c_out, h/stride, w/stride]`, in the weights' dtype.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (x, w, b) = affine_inputs(p, x, self.weight, Some(self.bias))?;
        p.tape.conv2d(&x, &w, b.as_ref(), self.params)
    }

    /// `conv(upsample_nearest(x, 2))`: `[n, c_in, h, w] → [n, c_out, 2h, 2w]`. A 3×3 "same"
    /// convolution runs as one op ([`crate::autodiff::Tape::upsample_conv2d`]: the backend may
    /// run it on the low-resolution input); a 1×1 one convolves first and upsamples the result
    /// (the same values, a quarter of the work); other kernels upsample first.
    pub fn forward_upsampled<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (x, w, b) = affine_inputs(p, x, self.weight, Some(self.bias))?;
        let (w, b) = (&w, b.as_ref());
        let shape = B::shape(&w.value);
        let kernel = &shape.dims()[2..];
        if kernel == [3, 3] && self.params == Conv2dParams::same(3) {
            p.tape.upsample_conv2d(&x, w, b)
        } else if kernel == [1, 1] && self.params == Conv2dParams::same(1) {
            p.tape.upsample(&p.tape.conv2d(&x, w, b, self.params)?, 2)
        } else {
            p.tape.conv2d(&p.tape.upsample(&x, 2)?, w, b, self.params)
        }
    }
}

/// Affine map `y = x·wᵀ + b`, `w [out, in]` (torch's `Linear`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub weight: ParamId,
    /// Bias `[out]` (None: `bias=False`, e.g. attention's `to_q`, `to_k`, `to_v`).
    pub bias: Option<ParamId>,
}

impl Linear {
    /// LeCun-normal `weight`, zero `bias`, under `at`.
    pub fn new<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, d_in: usize, d_out: usize) -> Result<Self> {
        let at = at.into();
        let mut l = Self::without_bias(store, &at, d_in, d_out)?;
        l.bias = Some(store.add(at.name("bias"), &[d_out], Init::Zeros)?);
        Ok(l)
    }

    /// LeCun-normal `weight` under `at`, no bias.
    pub fn without_bias<B: Backend>(
        store: &mut ParamStore<B>,
        at: impl Into<Scope>,
        d_in: usize,
        d_out: usize,
    ) -> Result<Self> {
        let at = at.into();
        Ok(Self {
            weight: store.add(at.name("weight"), &[d_out, d_in], Init::LecunNormal { fan_in: d_in })?,
            bias: None,
        })
    }

    /// `[.., in] → [.., out]` (leading dims flattened into rows for one matmul).
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let (x, w, bias) = affine_inputs(p, x, self.weight, self.bias)?;
        let (x, bias) = (&x, bias.as_ref());
        let shape = B::shape(&x.value);
        if shape.rank() <= 2 {
            return t.linear(x, &w, bias);
        }
        let d_in = *shape.dims().last().expect("rank > 2");
        let rows = shape.num_elements()? / d_in.max(1);
        let y = t.linear(&t.reshape(x, &Shape::new([rows, d_in]))?, &w, bias)?;
        let mut dims = shape.dims().to_vec();
        *dims.last_mut().expect("rank > 2") = B::shape(&y.value).dims()[1];
        t.reshape(&y, &Shape::new(dims))
    }

    /// The layer on the concatenation of `parts` along the last dim (`[.., in₁]`, `[.., in₂]`,
    /// … with `Σ inᵢ = in`), without building it: `Σᵢ xᵢ·Wᵢᵀ + b`, `Wᵢ` the weight's columns of
    /// part `i` (Flux's single-stream `proj_out` over attention ‖ MLP).
    pub fn forward_concat<B: Backend>(&self, p: &Bound<'_, B>, parts: &[&Var<B>]) -> Result<Var<B>> {
        let t = p.tape;
        let widths: Vec<usize> = parts.iter().map(|x| *B::shape(&x.value).dims().last().unwrap_or(&0)).collect();
        let d_in = B::shape(&p.p(self.weight).value).dims()[1];
        if parts.is_empty() || widths.iter().sum::<usize>() != d_in {
            return Err(TrainError::Mismatch(format!("inputs of widths {widths:?} for a linear layer of {d_in}")));
        }
        let mut out: Option<Var<B>> = None;
        let mut start = 0;
        for (i, (x, width)) in parts.iter().zip(&widths).enumerate() {
            let (x, w, bias) = affine_inputs(p, x, self.weight, if i == 0 { self.bias } else { None })?;
            let w = t.narrow(&w, 1, start, *width)?;
            start += width;
            let shape = B::shape(&x.value);
            let rows = shape.num_elements()? / width.max(&1);
            let y = t.linear(&t.reshape(&x, &Shape::new([rows, *width]))?, &w, bias.as_ref())?;
            out = Some(match out {
                None => y,
                Some(sum) => t.add(&sum, &y)?,
            });
        }
        let y = out.ok_or(TrainError::Internal("a concatenation of no parts"))?;
        let mut dims = B::shape(&parts[0].value).dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = B::shape(&y.value).dims()[1];
        t.reshape(&y, &Shape::new(dims))
    }
}

/// Layer normalisation over the last dim with affine `γ` (1), `β` (0) (torch's `LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale γ `[c]`.
    pub gamma: ParamId,
    /// Shift β `[c]`.
    pub beta: ParamId,
    /// Variance floor.
    pub eps: f32,
}

impl LayerNorm {
    /// Parameters `weight`, `bias` under `at` over `c` features.
    pub fn new<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, c: usize, eps: f32) -> Result<Self> {
        let at = at.into();
        Ok(Self {
            gamma: store.add(at.name("weight"), &[c], Init::Ones)?,
            beta: store.add(at.name("bias"), &[c], Init::Zeros)?,
            eps,
        })
    }

    /// `[.., c] → [.., c]`, in the weights' dtype.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (x, g, b) = affine_inputs(p, x, self.gamma, Some(self.beta))?;
        p.tape.layer_norm(&x, &g, b.as_ref().expect("a bias was asked for"), self.eps)
    }
}

/// Group normalisation with a per-channel affine (γ = 1, β = 0 at init).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// Scale γ `[c]`.
    pub gamma: ParamId,
    /// Shift β `[c]`.
    pub beta: ParamId,
    /// Groups and ε.
    pub params: GroupNormParams,
}

impl GroupNorm {
    /// `norm.groups` groups over `c` channels (clamped so that it divides `c`), ε `norm.eps`;
    /// parameters `weight`, `bias` under `at`.
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        at: impl Into<Scope>,
        c: usize,
        norm: GroupNormParams,
    ) -> Result<Self> {
        let at = at.into();
        let groups = (1..=norm.groups.min(c)).rev().find(|g| c.is_multiple_of(*g)).unwrap_or(1);
        Ok(Self {
            gamma: store.add(at.name("weight"), &[c], Init::Ones)?,
            beta: store.add(at.name("bias"), &[c], Init::Zeros)?,
            params: GroupNormParams { groups, eps: norm.eps },
        })
    }

    /// `[n, c, …] → [n, c, …]`, in the weights' dtype.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (x, g, b) = affine_inputs(p, x, self.gamma, Some(self.beta))?;
        p.tape.group_norm(&x, &g, b.as_ref().expect("a bias was asked for"), self.params)
    }

    /// `silu(group_norm(x))` as one op (the norm-then-activation of every ResBlock).
    pub fn forward_silu<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let (x, g, b) = affine_inputs(p, x, self.gamma, Some(self.beta))?;
        p.tape.group_norm_silu(&x, &g, b.as_ref().expect("a bias was asked for"), self.params)
    }
}

/// `(x, weight, bias)` of a layer, in the dtype it computes in.
type AffineInputs<B> = (Var<B>, Var<B>, Option<Var<B>>);

/// A layer's input, weight and bias in the dtype it computes in ([`Bound::compute_dtype`]):
/// its weights' storage type, or under autocast the autocast dtype. Each is cast on the way
/// in, differentiably; a norm's statistics and every product's accumulation stay in f32 in
/// the backends' kernels whatever the storage type.
fn affine_inputs<B: Backend>(p: &Bound<'_, B>, x: &Var<B>, w: ParamId, b: Option<ParamId>) -> Result<AffineInputs<B>> {
    let dtype = p.compute_dtype(w);
    Ok((p.tape.cast(x, dtype)?, p.weight(w, dtype)?, b.map(|b| p.weight(b, dtype)).transpose()?))
}

/// RMS norm with a learned scale (diffusers' `RMSNorm`, T5's `T5LayerNorm`):
/// `x / √(mean(x²) + ε) · w` over the last dim, computed in f32 as both do, returned in `x`'s
/// dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: ParamId,
    dim: usize,
    eps: f32,
}

impl RmsNorm {
    /// `weight [d]` (ones) under `at`, with `eps`.
    pub fn new<B: Backend>(s: &mut ParamStore<B>, at: impl Into<Scope>, dim: usize, eps: f32) -> Result<Self> {
        Ok(Self { weight: s.add(at.into().name("weight"), &[dim], Init::Ones)?, dim, eps })
    }

    /// `[.., d] → [.., d]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        let t = p.tape;
        let (shape, dtype, device) = (B::shape(&x.value), B::dtype(&x.value), B::device(&x.value));
        let rows = shape.num_elements()? / self.dim.max(1);
        let x32 = t.reshape(&t.cast(x, DType::F32)?, &Shape::new([rows, self.dim]))?;
        let mean_of = t.constant(B::full(&Shape::new([self.dim, 1]), 1.0 / self.dim as f32, DType::F32, &device)?);
        let mean_sq = t.matmul(&t.unary(UnaryOp::Square, &x32)?, &mean_of, Transpose::default())?; // [rows, 1]
        let eps = t.constant(B::full(&Shape::new([1]), self.eps, DType::F32, &device)?);
        let rms = t.unary(UnaryOp::Sqrt, &t.add(&mean_sq, &eps)?)?;
        let normed = t.binary(BinaryOp::Div, &x32, &rms)?;
        let w = p.weight(self.weight, DType::F32)?;
        let y = t.mul(&normed, &w)?;
        t.cast(&t.reshape(&y, &shape)?, dtype)
    }
}
