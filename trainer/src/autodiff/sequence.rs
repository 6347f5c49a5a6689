//! The differentiable ops of sequence models (transformer blocks): activations, axis
//! permutation and narrowing, layer norm, scaled dot-product attention.

use lisa_core::backend::{AttentionParams, Backend, DType, Shape, UnaryOp, geometry::inverse_permutation};

use super::{Tape, Var};
use crate::error::Result;

impl<B: Backend> Tape<B> {
    /// `f(a)` elementwise; backward `g·f'(a)`.
    pub fn unary(&self, op: UnaryOp, a: &Var<B>) -> Result<Var<B>> {
        let value = B::unary(op, &a.value)?;
        let x = a.value.clone();
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::unary_backward(op, &x, g)?)])))
    }

    /// `a` stored as `dtype` (mixed precision: a half-precision frozen network between f32
    /// ones); backward casts the gradient back to `a`'s dtype. A no-op when equal.
    pub fn cast(&self, a: &Var<B>, dtype: DType) -> Result<Var<B>> {
        let from = B::dtype(&a.value);
        if from == dtype {
            return Ok(a.clone());
        }
        let value = B::cast(&a.value, dtype)?;
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::cast(g, from)?)])))
    }

    /// The dims of `a` reordered (`out.dims[i] = a.dims[axes[i]]`); backward permutes back.
    pub fn permute(&self, a: &Var<B>, axes: &[usize]) -> Result<Var<B>> {
        let value = B::permute(&a.value, axes)?;
        let inverse = inverse_permutation(axes);
        Ok(self.record(value, &[a], move |g| Ok(vec![Some(B::permute(g, &inverse)?)])))
    }

    /// Elements `start .. start + len` of `axis`; backward pads the gradient with zeros.
    pub fn narrow(&self, a: &Var<B>, axis: usize, start: usize, len: usize) -> Result<Var<B>> {
        let value = B::narrow(&a.value, axis, start, len)?;
        let shape = B::shape(&a.value);
        let dtype = B::dtype(&a.value);
        Ok(self.record(value, &[a], move |g| {
            let device = B::device(g);
            let pad = |n: usize| -> lisa_core::Result<Option<B::Tensor>> {
                if n == 0 {
                    return Ok(None);
                }
                let mut d = shape.dims().to_vec();
                d[axis] = n;
                B::zeros(&Shape::new(d), dtype, &device).map(Some)
            };
            let (before, after) = (pad(start)?, pad(shape.dims()[axis] - start - len)?);
            let parts: Vec<&B::Tensor> = before.iter().chain(std::iter::once(g)).chain(after.iter()).collect();
            Ok(vec![Some(B::concat(&parts, axis)?)])
        }))
    }

    /// Zero padding of the last two dims by `[top, bottom, left, right]`; backward crops.
    pub fn pad_spatial(&self, a: &Var<B>, pad: [usize; 4]) -> Result<Var<B>> {
        let value = B::pad_spatial(&a.value, pad)?;
        let s = B::shape(&a.value);
        let (r, h, w) = (s.rank(), s.dims()[s.rank() - 2], s.dims()[s.rank() - 1]);
        Ok(self.record(value, &[a], move |g| {
            let g = B::narrow(g, r - 2, pad[0], h)?;
            Ok(vec![Some(B::narrow(&g, r - 1, pad[2], w)?)])
        }))
    }

    /// Layer norm over the last dim with affine `γ`, `β` (`[C]`).
    pub fn layer_norm(&self, x: &Var<B>, gamma: &Var<B>, beta: &Var<B>, eps: f32) -> Result<Var<B>> {
        let out = B::layer_norm(&x.value, &gamma.value, &beta.value, eps)?;
        let value = out.output.clone();
        let need = [x.requires_grad(), gamma.requires_grad(), beta.requires_grad()];
        if !self.grad_enabled() || !need.iter().any(|&n| n) {
            return Ok(self.constant(value));
        }
        let (xv, gv) = (x.value.clone(), gamma.value.clone());
        Ok(self.record(value, &[x, gamma, beta], move |g| {
            let grads = B::layer_norm_backward(&xv, &gv, &out, g, eps)?;
            Ok(vec![need[0].then_some(grads.input), need[1].then_some(grads.gamma), need[2].then_some(grads.beta)])
        }))
    }

    /// `softmax(s·Q·Kᵀ + M)·V` over groups: `q [g, t_q, d]`, `k [g, t_k, d]`, `v [g, t_k, d_v]`
    /// (`M`: the causal mask when `params.causal`). Saves `q`, `k`, `v`, the output and the
    /// per-row log-sum-exp (`[g, t_q]`), never the `[t_q, t_k]` probabilities: the backward
    /// recomputes them tile by tile.
    pub fn attention(&self, q: &Var<B>, k: &Var<B>, v: &Var<B>, params: AttentionParams) -> Result<Var<B>> {
        let need = [q.requires_grad(), k.requires_grad(), v.requires_grad()];
        if !self.grad_enabled() || !need.iter().any(|&n| n) {
            return Ok(self.constant(B::attention(&q.value, &k.value, &v.value, params)?));
        }
        let forward = B::attention_forward(&q.value, &k.value, &v.value, params)?;
        let value = forward.out.clone();
        let (qv, kv, vv) = (q.value.clone(), k.value.clone(), v.value.clone());
        Ok(self.record(value, &[q, k, v], move |g| {
            let grads = B::attention_backward(&qv, &kv, &vv, &forward, g, params)?;
            Ok(vec![need[0].then_some(grads.q), need[1].then_some(grads.k), need[2].then_some(grads.v)])
        }))
    }
}
