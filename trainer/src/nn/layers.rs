use lisa_core::backend::{Backend, Conv2dParams, GroupNormParams};

use crate::autodiff::Var;
use crate::error::Result;
use crate::params::{Bound, Init, ParamId, ParamStore};

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
    /// A `k×k` conv with "same" padding (stride 1) or the given stride; LeCun-normal weights,
    /// or zeros when `zero` (ControlNet zero convs, the LISA decoder's output conv).
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        zero: bool,
        trainable: bool,
    ) -> Result<Self> {
        let init = if zero { Init::Zeros } else { Init::LecunNormal { fan_in: c_in * k * k } };
        Ok(Self {
            weight: store.add(format!("{name}.weight"), &[c_out, c_in, k, k], init, trainable)?,
            bias: store.add(format!("{name}.bias"), &[c_out], Init::Zeros, trainable)?,
            params: Conv2dParams { stride: [stride, stride], padding: [k / 2, k / 2] },
        })
    }

    /// `[n, c_in, h, w] → [n, c_out, h/stride, w/stride]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        p.tape.conv2d(x, p.p(self.weight), Some(p.p(self.bias)), self.params)
    }
}

/// Affine map `y = x·wᵀ + b`, `w [out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub weight: ParamId,
    /// Bias `[out]`.
    pub bias: ParamId,
}

impl Linear {
    /// LeCun-normal weights, zero bias.
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        name: &str,
        d_in: usize,
        d_out: usize,
        trainable: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: store.add(
                format!("{name}.weight"),
                &[d_out, d_in],
                Init::LecunNormal { fan_in: d_in },
                trainable,
            )?,
            bias: store.add(format!("{name}.bias"), &[d_out], Init::Zeros, trainable)?,
        })
    }

    /// `[n, in] → [n, out]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        p.tape.linear(x, p.p(self.weight), Some(p.p(self.bias)))
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
    /// `groups` groups over `c` channels (clamped so that it divides `c`).
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        name: &str,
        c: usize,
        groups: usize,
        eps: f32,
        trainable: bool,
    ) -> Result<Self> {
        let groups = (1..=groups.min(c)).rev().find(|g| c.is_multiple_of(*g)).unwrap_or(1);
        Ok(Self {
            gamma: store.add(format!("{name}.weight"), &[c], Init::Ones, trainable)?,
            beta: store.add(format!("{name}.bias"), &[c], Init::Zeros, trainable)?,
            params: GroupNormParams { groups, eps },
        })
    }

    /// `[n, c, …] → [n, c, …]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, x: &Var<B>) -> Result<Var<B>> {
        p.tape.group_norm(x, p.p(self.gamma), p.p(self.beta), self.params)
    }
}
