//! The differentiable ops: forward through the backend, backward beside it.
//! Each backward computes only the gradients its inputs need.

use lisa_core::backend::{
    BinaryOp, Conv2dParams, DType, GroupNormGrads, GroupNormOutput, GroupNormParams, Shape, Transpose,
};

use super::{Tape, Var};
use crate::error::Result;
use lisa_core::backend::Backend;

impl<B: Backend> Tape<B> {
    /// `a` and `b` in one dtype, torch's type promotion: operands of different dtypes are
    /// both cast (differentiably) to the wider one, f32 for f16 with bf16. Under autocast an
    /// f32 residual meeting a half activation is added in f32, as in torch.
    pub fn promote(&self, a: &Var<B>, b: &Var<B>) -> Result<(Var<B>, Var<B>)> {
        let (da, db) = (B::dtype(&a.value), B::dtype(&b.value));
        if da == db {
            return Ok((a.clone(), b.clone()));
        }
        let wide = DType::F32;
        Ok((self.cast(a, wide)?, self.cast(b, wide)?))
    }

    /// `a ∘ b` with broadcasting (add, sub, mul); backward sums over the broadcast dims.
    /// Operands of different dtypes are promoted first ([`Tape::promote`]).
    pub fn binary(&self, op: BinaryOp, a: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        if B::dtype(&a.value) != B::dtype(&b.value) {
            let (a, b) = self.promote(a, b)?;
            return self.binary(op, &a, &b);
        }
        let value = B::binary(op, &a.value, &b.value)?;
        let (sa, sb) = (B::shape(&a.value), B::shape(&b.value));
        let need = (a.requires_grad(), b.requires_grad());
        let saved = match op {
            BinaryOp::Mul | BinaryOp::Div => Some((a.value.clone(), b.value.clone())),
            _ => None,
        };
        Ok(self.record(value, &[a, b], move |g| {
            let (da, db) = match (op, &saved) {
                (BinaryOp::Add, _) => (g.clone(), g.clone()),
                (BinaryOp::Sub, _) => (g.clone(), B::scale(g, -1.0)?),
                (BinaryOp::Mul, Some((av, bv))) => {
                    let da = if need.0 { B::mul(g, bv)? } else { g.clone() };
                    let db = if need.1 { B::mul(g, av)? } else { g.clone() };
                    (da, db)
                }
                // d(a/b) = g/b, −g·a/b²
                (BinaryOp::Div, Some((av, bv))) => {
                    let da = B::div(g, bv)?;
                    let db = if need.1 { B::scale(&B::div(&B::mul(&da, av)?, bv)?, -1.0)? } else { g.clone() };
                    (da, db)
                }
                _ => unreachable!("Mul/Div always save their operands"),
            };
            Ok(vec![
                if need.0 { Some(B::sum_to_shape(&da, &sa)?) } else { None },
                if need.1 { Some(B::sum_to_shape(&db, &sb)?) } else { None },
            ])
        }))
    }

    /// `a + b` (broadcasting).
    pub fn add(&self, a: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        self.binary(BinaryOp::Add, a, b)
    }

    /// `a · b` (broadcasting).
    pub fn mul(&self, a: &Var<B>, b: &Var<B>) -> Result<Var<B>> {
        self.binary(BinaryOp::Mul, a, b)
    }

    /// `s · a`.
    pub fn scale(&self, a: &Var<B>, s: f32) -> Result<Var<B>> {
        let value = B::scale(&a.value, s)?;
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::scale(g, s)?)])))
    }

    /// `silu(a) = a·σ(a)`.
    pub fn silu(&self, a: &Var<B>) -> Result<Var<B>> {
        let value = B::silu(&a.value)?;
        let x = a.value.clone();
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::silu_backward(&x, g)?)])))
    }

    /// The same values with another shape.
    pub fn reshape(&self, a: &Var<B>, shape: &Shape) -> Result<Var<B>> {
        let value = B::reshape(&a.value, shape)?;
        let original = B::shape(&a.value);
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::reshape(g, &original)?)])))
    }

    /// `op(a)·op(b)` (batched, leading dims broadcast as torch's `matmul`). With
    /// `C = op(A)·op(B)`: `dA = G·op(B)ᵀ` (transposed back when `A` was), `dB = op(A)ᵀ·G`
    /// (likewise), each summed over the dims its operand was broadcast along.
    pub fn matmul(&self, a: &Var<B>, b: &Var<B>, t: Transpose) -> Result<Var<B>> {
        if B::dtype(&a.value) != B::dtype(&b.value) {
            let (a, b) = self.promote(a, b)?;
            return self.matmul(&a, &b, t);
        }
        let value = B::matmul_broadcast(&a.value, &b.value, t)?;
        let need = (a.requires_grad(), b.requires_grad());
        let (av, bv) = (a.value.clone(), b.value.clone());
        Ok(self.record(value, &[a, b], move |g| {
            let reduce = |d: B::Tensor, like: &B::Tensor| -> lisa_core::Result<B::Tensor> {
                let s = B::shape(like);
                if B::shape(&d) == s { Ok(d) } else { B::sum_to_shape(&d, &s) }
            };
            let da = if !need.0 {
                None
            } else if t.a {
                Some(reduce(B::matmul_broadcast(&bv, g, Transpose { a: t.b, b: true })?, &av)?)
            } else {
                Some(reduce(B::matmul_broadcast(g, &bv, Transpose { a: false, b: !t.b })?, &av)?)
            };
            let db = if !need.1 {
                None
            } else if t.b {
                Some(reduce(B::matmul_broadcast(g, &av, Transpose { a: true, b: t.a })?, &bv)?)
            } else {
                Some(reduce(B::matmul_broadcast(&av, g, Transpose { a: !t.a, b: false })?, &bv)?)
            };
            Ok(vec![da, db])
        }))
    }

    /// Affine map of rows: `x [n, in] · wᵀ [in, out] + b [out]`.
    pub fn linear(&self, x: &Var<B>, w: &Var<B>, b: Option<&Var<B>>) -> Result<Var<B>> {
        let y = self.matmul(x, w, Transpose { a: false, b: true })?;
        match b {
            Some(b) => self.add(&y, b),
            None => Ok(y),
        }
    }

    /// 2-D convolution with optional bias.
    pub fn conv2d(&self, x: &Var<B>, w: &Var<B>, b: Option<&Var<B>>, p: Conv2dParams) -> Result<Var<B>> {
        let value = B::conv2d(&x.value, &w.value, b.map(|b| &b.value), p)?;
        let (xs, ws) = (B::shape(&x.value), B::shape(&w.value));
        self.record_convolution(
            value,
            (x, w, b),
            move |g, w| B::conv2d_backward_data(g, w, &xs, p),
            move |x, g| B::conv2d_backward_weight(x, g, &ws, p),
        )
    }

    /// Nearest ×2 upsampling, then a 3×3 "same" convolution, as one op
    /// ([`lisa_core::backend::UpsampleConvOps`]): `x [n, c_in, h, w]`, `w [c_out, c_in, 3, 3]` →
    /// `[n, c_out, 2h, 2w]`. Saves the low-resolution `x` (not its upsampled copy) for `∂L/∂w`.
    pub fn upsample_conv2d(&self, x: &Var<B>, w: &Var<B>, b: Option<&Var<B>>) -> Result<Var<B>> {
        let value = B::upsample_conv2d(&x.value, &w.value, b.map(|b| &b.value))?;
        let (xs, ws) = (B::shape(&x.value), B::shape(&w.value));
        self.record_convolution(
            value,
            (x, w, b),
            move |g, w| B::upsample_conv2d_backward_data(g, w, &xs),
            move |x, g| B::upsample_conv2d_backward_weight(x, g, &ws),
        )
    }

    /// Records a convolution-like op `y = f(x, w) + b`: `∂L/∂x = data(∂L/∂y, w)`,
    /// `∂L/∂w = weight(x, ∂L/∂y)`, `∂L/∂b` the sum over batch and pixels. Saves only what the
    /// needed gradients read: `w` for `∂L/∂x`, `x` for `∂L/∂w`.
    fn record_convolution(
        &self,
        value: B::Tensor,
        (x, w, b): (&Var<B>, &Var<B>, Option<&Var<B>>),
        data: impl Fn(&B::Tensor, &B::Tensor) -> lisa_core::Result<B::Tensor> + 'static,
        weight: impl Fn(&B::Tensor, &B::Tensor) -> lisa_core::Result<B::Tensor> + 'static,
    ) -> Result<Var<B>> {
        let need = [x.requires_grad(), w.requires_grad(), b.is_some_and(|b| b.requires_grad())];
        let wv = need[0].then(|| w.value.clone());
        let xv = need[1].then(|| x.value.clone());
        let inputs: Vec<&Var<B>> = match b {
            Some(b) => vec![x, w, b],
            None => vec![x, w],
        };
        let has_bias = b.is_some();
        Ok(self.record(value, &inputs, move |g| {
            let dx = wv.as_ref().map(|w| data(g, w)).transpose()?;
            let dw = xv.as_ref().map(|x| weight(x, g)).transpose()?;
            let mut out = vec![dx, dw];
            if has_bias {
                out.push(if need[2] { Some(B::conv2d_backward_bias(g)?) } else { None });
            }
            Ok(out)
        }))
    }

    /// `silu(group_norm(x))` as one op ([`lisa_core::backend::NormOps::group_norm_silu`]): the
    /// backward recomputes the pre-activation from `x` and the statistics, so it is never stored.
    pub fn group_norm_silu(&self, x: &Var<B>, gamma: &Var<B>, beta: &Var<B>, p: GroupNormParams) -> Result<Var<B>> {
        let out = B::group_norm_silu(&x.value, &gamma.value, &beta.value, p)?;
        let (xv, gv, bv) = (x.value.clone(), gamma.value.clone(), beta.value.clone());
        self.record_group_norm(out, (x, gamma, beta), move |stats, g| {
            B::group_norm_silu_backward(&xv, &gv, &bv, stats, g, p)
        })
    }

    /// Group norm with affine `γ`, `β`.
    pub fn group_norm(&self, x: &Var<B>, gamma: &Var<B>, beta: &Var<B>, p: GroupNormParams) -> Result<Var<B>> {
        let out = B::group_norm(&x.value, &gamma.value, &beta.value, p)?;
        let (xv, gv) = (x.value.clone(), gamma.value.clone());
        self.record_group_norm(out, (x, gamma, beta), move |stats, g| B::group_norm_backward(&xv, &gv, stats, g, p))
    }

    /// Records a group-norm-like op whose forward returned `out` (output and statistics):
    /// a constant when nothing needs a gradient, else `backward(statistics, ∂L/∂y)` gives the
    /// gradients of `x`, `γ`, `β`, each kept where it is needed.
    fn record_group_norm(
        &self,
        out: GroupNormOutput<B::Tensor>,
        (x, gamma, beta): (&Var<B>, &Var<B>, &Var<B>),
        backward: impl FnOnce(&GroupNormOutput<B::Tensor>, &B::Tensor) -> lisa_core::Result<GroupNormGrads<B::Tensor>>
        + 'static,
    ) -> Result<Var<B>> {
        let value = out.output.clone();
        let need = [x.requires_grad(), gamma.requires_grad(), beta.requires_grad()];
        if !self.grad_enabled() || !need.iter().any(|&n| n) {
            return Ok(self.constant(value));
        }
        Ok(self.record(value, &[x, gamma, beta], move |g| {
            let grads = backward(&out, g)?;
            Ok(vec![need[0].then_some(grads.input), need[1].then_some(grads.gamma), need[2].then_some(grads.beta)])
        }))
    }

    /// Nearest upsampling by `factor`.
    pub fn upsample(&self, x: &Var<B>, factor: usize) -> Result<Var<B>> {
        let value = B::upsample_nearest(&x.value, factor)?;
        Ok(self.record(value, &[x], move |g| Ok(vec![Some(B::upsample_nearest_backward(g, factor)?)])))
    }

    /// Concatenation along channels; backward slices the gradient.
    pub fn concat_channels(&self, parts: &[&Var<B>]) -> Result<Var<B>> {
        let values: Vec<&B::Tensor> = parts.iter().map(|p| &p.value).collect();
        let value = B::concat_channels(&values)?;
        let spans: Vec<(usize, usize, bool)> = {
            let mut start = 0;
            parts
                .iter()
                .map(|p| {
                    let c = B::shape(&p.value).dims()[1];
                    start += c;
                    (start - c, c, p.requires_grad())
                })
                .collect()
        };
        Ok(self.record(value, parts, move |g| {
            spans
                .iter()
                .map(|&(s, c, need)| if need { B::slice_channels(g, s, c).map(Some) } else { Ok(None) })
                .collect::<lisa_core::Result<Vec<_>>>()
                .map_err(Into::into)
        }))
    }

    /// Channels `start .. start + len` of `x [n, c, …]` ([`Tape::narrow`] of dim 1); backward
    /// pads the gradient with zeros.
    pub fn slice_channels(&self, x: &Var<B>, start: usize, len: usize) -> Result<Var<B>> {
        self.narrow(x, 1, start, len)
    }

    /// The first `k` samples of a batch `x [n, …]` (batch is the outermost, contiguous dim).
    pub fn slice_batch(&self, x: &Var<B>, k: usize) -> Result<Var<B>> {
        let shape = B::shape(&x.value);
        let n = shape.dims().first().copied().unwrap_or(0);
        if k == n {
            return Ok(x.clone());
        }
        let per = shape.num_elements()? / n.max(1);
        let flat = self.reshape(x, &Shape::new([1, n, per]))?;
        let part = self.slice_channels(&flat, 0, k)?;
        let mut d = shape.dims().to_vec();
        d[0] = k;
        self.reshape(&part, &Shape::new(d))
    }

    /// Softmax over the last dimension.
    pub fn softmax_last(&self, x: &Var<B>) -> Result<Var<B>> {
        let value = B::softmax_last(&x.value)?;
        let y = value.clone();
        Ok(self.record(value, &[x], move |g| Ok(vec![Some(B::softmax_last_backward(&y, g)?)])))
    }
}
