use alloc::vec::Vec;

use super::geometry::Transpose;
use super::{DType, LayoutOps, MatmulOps, ReduceOps, Shape};
use crate::{Error, Result};

/// The most score elements (`heads · query rows · keys`) the default attention holds at
/// once: 2²⁴ (64 MiB in f32). Larger problems run in chunks of heads, then of query rows.
pub const ATTENTION_SCORE_BUDGET: usize = 1 << 24;

/// What a scaled dot-product attention computes besides its inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// The score scale `s` (`1/√d` usually).
    pub scale: f32,
    /// Causal: query `i` sees keys `j ≤ i` only (text encoders); needs `t_q = t_k`.
    pub causal: bool,
}

impl AttentionParams {
    /// Full (non-causal) attention with scale `1/√head_dim`.
    pub fn new(head_dim: usize) -> Self {
        Self { scale: 1.0 / libm::sqrtf(head_dim.max(1) as f32), causal: false }
    }

    /// The same, causal.
    pub fn causal(self) -> Self {
        Self { causal: true, ..self }
    }
}

/// The score a masked key gets before the softmax: finite (no infinities on any device),
/// and low enough that its probability is exactly 0 in f32.
const MASKED_SCORE: f32 = -1e30;

/// What [`AttentionOps::attention_forward`] returns: the output and what its backward needs.
#[derive(Debug, Clone)]
pub struct AttentionForward<T> {
    /// `O`, `[g, t_q, d_v]`, in the inputs' dtype.
    pub out: T,
    /// The per-row log-sum-exp of the scaled, masked scores, `L_i = log Σ_j exp(s·q_i·k_j + M_ij)`,
    /// `[g, t_q]` in `f32`, so that a backward can recompute `P = exp(s·QKᵀ + M − L)` tile by
    /// tile without a second pass for the softmax statistics. `None` from the chunked default
    /// (its backward recomputes the softmax from the scores).
    pub lse: Option<T>,
}

/// The gradients of [`AttentionOps::attention`].
#[derive(Debug, Clone)]
pub struct AttentionGrads<T> {
    /// `∂L/∂q`, `[g, t_q, d]`.
    pub q: T,
    /// `∂L/∂k`, `[g, t_k, d]`.
    pub k: T,
    /// `∂L/∂v`, `[g, t_k, d_v]`.
    pub v: T,
}

/// Scaled dot-product attention over `g` independent groups (batch × heads).
///
/// The defaults never hold more than [`ATTENTION_SCORE_BUDGET`] scores: they run over
/// chunks of groups (and of query rows when one group is larger), and the backward
/// recomputes the probabilities chunk by chunk instead of saving them. Scores and softmax
/// run in `f32` whatever the storage type (diffusers' `upcast_attention`, always on).
pub trait AttentionOps: MatmulOps + ReduceOps + LayoutOps {
    /// `O = softmax(s·Q·Kᵀ + M)·V` per group: `q [g, t_q, d]`, `k [g, t_k, d]`,
    /// `v [g, t_k, d_v]` → `[g, t_q, d_v]`, softmax over the keys, `M` the causal mask when
    /// asked for (`−∞` above the diagonal).
    fn attention(
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        params: AttentionParams,
    ) -> Result<Self::Tensor> {
        Ok(Self::attention_forward(q, k, v, params)?.out)
    }

    /// [`AttentionOps::attention`] for training: the output with what
    /// [`AttentionOps::attention_backward`] needs (the per-row log-sum-exp, where the
    /// backend's kernel computes one).
    fn attention_forward(
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        params: AttentionParams,
    ) -> Result<AttentionForward<Self::Tensor>> {
        Ok(AttentionForward { out: attention_chunked::<Self>(q, k, v, params, ATTENTION_SCORE_BUDGET)?, lse: None })
    }

    /// Backward of [`AttentionOps::attention`] from `∂L/∂O`, recomputing `P = softmax(s·QKᵀ + M)`
    /// (from `forward.lse` where the backend keeps it):
    /// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − Σ_keys dP ⊙ P)`, `dQ = s·dS·K`,
    /// `dK = s·dSᵀ·Q` (`Σ_keys dP ⊙ P = rowsum(dO ⊙ O)`).
    fn attention_backward(
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        forward: &AttentionForward<Self::Tensor>,
        grad_out: &Self::Tensor,
        params: AttentionParams,
    ) -> Result<AttentionGrads<Self::Tensor>> {
        let _ = forward;
        attention_backward_chunked::<Self>(q, k, v, grad_out, params, ATTENTION_SCORE_BUDGET)
    }
}

/// [`AttentionOps::attention`]'s default, holding at most `budget` scores at once.
pub fn attention_chunked<B: AttentionOps>(
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    params: AttentionParams,
    budget: usize,
) -> Result<B::Tensor> {
    let geo = AttentionGeometry::new::<B>("attention", q, k, v, params, budget)?;
    let mut groups = Vec::new();
    for (g0, gc) in geo.group_chunks() {
        let (kc, vc) = (upcast::<B>(&B::narrow(k, 0, g0, gc)?)?, upcast::<B>(&B::narrow(v, 0, g0, gc)?)?);
        let qg = B::narrow(q, 0, g0, gc)?;
        let mut rows = Vec::new();
        for (r0, rc) in geo.row_chunks(gc) {
            let p = probabilities::<B>(&upcast::<B>(&B::narrow(&qg, 1, r0, rc)?)?, &kc, params, r0)?;
            rows.push(B::matmul(&p, &vc, Transpose::default())?); // [gc, rc, d_v]
        }
        groups.push(join::<B>(rows, 1)?);
    }
    B::cast(&join::<B>(groups, 0)?, geo.dtype)
}

/// [`AttentionOps::attention_backward`]'s default, holding at most `budget` scores at once.
pub fn attention_backward_chunked<B: AttentionOps>(
    q: &B::Tensor,
    k: &B::Tensor,
    v: &B::Tensor,
    grad_out: &B::Tensor,
    params: AttentionParams,
    budget: usize,
) -> Result<AttentionGrads<B::Tensor>> {
    const OP: &str = "attention_backward";
    let geo = AttentionGeometry::new::<B>(OP, q, k, v, params, budget)?;
    let scale = params.scale;
    let d_v = B::shape(v).dims()[2];
    Shape::new([geo.groups, geo.queries, d_v]).expect_eq(OP, &B::shape(grad_out))?;
    let (mut dq_groups, mut dk_groups, mut dv_groups) = (Vec::new(), Vec::new(), Vec::new());
    for (g0, gc) in geo.group_chunks() {
        let (kc, vc) = (upcast::<B>(&B::narrow(k, 0, g0, gc)?)?, upcast::<B>(&B::narrow(v, 0, g0, gc)?)?);
        let (qg, gg) = (B::narrow(q, 0, g0, gc)?, B::narrow(grad_out, 0, g0, gc)?);
        let mut dq_rows: Vec<B::Tensor> = Vec::new();
        let (mut dk, mut dv): (Option<B::Tensor>, Option<B::Tensor>) = (None, None);
        for (r0, rc) in geo.row_chunks(gc) {
            let qc = upcast::<B>(&B::narrow(&qg, 1, r0, rc)?)?;
            let go = upcast::<B>(&B::narrow(&gg, 1, r0, rc)?)?;
            let p = probabilities::<B>(&qc, &kc, params, r0)?; // [gc, rc, t_k]
            let dv_part = B::matmul(&p, &go, Transpose { a: true, b: false })?; // [gc, t_k, d_v]
            let dp = B::matmul(&go, &vc, Transpose { a: false, b: true })?; // [gc, rc, t_k]
            let ds = B::scale(&B::softmax_last_backward(&p, &dp)?, scale)?;
            dq_rows.push(B::matmul(&ds, &kc, Transpose::default())?); // [gc, rc, d]
            let dk_part = B::matmul(&ds, &qc, Transpose { a: true, b: false })?; // [gc, t_k, d]
            dk = Some(match dk {
                Some(acc) => B::add(&acc, &dk_part)?,
                None => dk_part,
            });
            dv = Some(match dv {
                Some(acc) => B::add(&acc, &dv_part)?,
                None => dv_part,
            });
        }
        dq_groups.push(join::<B>(dq_rows, 1)?);
        dk_groups.push(dk.ok_or(Error::Empty { op: OP })?);
        dv_groups.push(dv.ok_or(Error::Empty { op: OP })?);
    }
    Ok(AttentionGrads {
        q: B::cast(&join::<B>(dq_groups, 0)?, geo.dtype)?,
        k: B::cast(&join::<B>(dk_groups, 0)?, geo.dtype)?,
        v: B::cast(&join::<B>(dv_groups, 0)?, geo.dtype)?,
    })
}

/// `softmax(s·Q·Kᵀ + M)` over the keys for the query rows `r0 ..`: `[gc, rc, d] × [gc, t_k, d]
/// → [gc, rc, t_k]`.
fn probabilities<B: AttentionOps>(
    q: &B::Tensor,
    k: &B::Tensor,
    params: AttentionParams,
    r0: usize,
) -> Result<B::Tensor> {
    let scores = B::scale(&B::matmul(q, k, Transpose { a: false, b: true })?, params.scale)?;
    if !params.causal {
        return B::softmax_last(&scores);
    }
    // Row i of the chunk (query r0 + i) sees keys 0 ..= r0 + i.
    let dims = B::shape(&scores);
    let (rc, t_k) = (dims.dims()[1], dims.dims()[2]);
    let mut mask = alloc::vec![0.0f32; rc * t_k];
    for (i, row) in mask.chunks_mut(t_k).enumerate() {
        for v in row.iter_mut().skip(r0 + i + 1) {
            *v = MASKED_SCORE;
        }
    }
    let mask = B::from_slice(&mask, &Shape::new([rc, t_k]), DType::F32, &B::device(&scores))?;
    B::softmax_last(&B::add(&scores, &mask)?)
}

/// `t` in `f32` (a no-op for `f32` tensors).
fn upcast<B: AttentionOps>(t: &B::Tensor) -> Result<B::Tensor> {
    if B::dtype(t) == DType::F32 { Ok(t.clone()) } else { B::cast(t, DType::F32) }
}

/// The chunks joined along `axis` (one chunk: itself).
fn join<B: AttentionOps>(mut parts: Vec<B::Tensor>, axis: usize) -> Result<B::Tensor> {
    if parts.len() == 1 {
        return parts.pop().ok_or(Error::Empty { op: "attention" });
    }
    let refs: Vec<&B::Tensor> = parts.iter().collect();
    B::concat(&refs, axis)
}

/// The validated sizes of one attention call: `q [groups, queries, head_dim]`,
/// `k [groups, keys, head_dim]`, `v [groups, keys, value_dim]`. Every backend checks its
/// inputs with it, so all reject the same calls with the same errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionDims {
    /// Independent groups (batch × heads).
    pub groups: usize,
    /// Query rows per group, `t_q`.
    pub queries: usize,
    /// Keys (and values) per group, `t_k`.
    pub keys: usize,
    /// The query/key width `d`.
    pub head_dim: usize,
    /// The value width `d_v`.
    pub value_dim: usize,
}

impl AttentionDims {
    /// Checks ranks, matching sizes, non-empty sizes, a finite scale, and `t_q = t_k` when causal.
    pub fn new(op: &'static str, q: &Shape, k: &Shape, v: &Shape, params: AttentionParams) -> Result<Self> {
        for s in [q, k, v] {
            s.expect_rank(op, 3)?;
        }
        let (g, t_q, d) = (q.dims()[0], q.dims()[1], q.dims()[2]);
        let t_k = k.dims()[1];
        Shape::new([g, t_k, d]).expect_eq(op, k)?;
        if v.dims()[0] != g || v.dims()[1] != t_k {
            return Err(Error::ShapeMismatch { op, expected: Shape::new([g, t_k, v.dims()[2]]), got: v.clone() });
        }
        if g == 0 || t_q == 0 || t_k == 0 || d == 0 || v.dims()[2] == 0 {
            return Err(Error::Empty { op });
        }
        let scale = params.scale;
        if !scale.is_finite() {
            return Err(Error::invalid(op, alloc::format!("scale must be finite, got {scale}")));
        }
        if params.causal && t_q != t_k {
            return Err(Error::invalid(
                op,
                alloc::format!("causal attention needs as many queries as keys, got {t_q} and {t_k}"),
            ));
        }
        Ok(Self { groups: g, queries: t_q, keys: t_k, head_dim: d, value_dim: v.dims()[2] })
    }

    /// The output's shape, `[g, t_q, d_v]` (also `∂L/∂O`'s).
    pub fn out_shape(&self) -> Shape {
        Shape::new([self.groups, self.queries, self.value_dim])
    }

    /// The log-sum-exp's shape, `[g, t_q]`.
    pub fn lse_shape(&self) -> Shape {
        Shape::new([self.groups, self.queries])
    }

    /// The backward's other inputs: the forward's output and `∂L/∂O` `[g, t_q, d_v]`, and its
    /// log-sum-exp `[g, t_q]`.
    pub fn check_backward(&self, op: &'static str, out: &Shape, lse: &Shape, grad_out: &Shape) -> Result<()> {
        self.out_shape().expect_eq(op, out)?;
        self.out_shape().expect_eq(op, grad_out)?;
        self.lse_shape().expect_eq(op, lse)
    }
}

/// The validated sizes of one attention call and its chunking.
#[derive(Debug, Clone, Copy)]
struct AttentionGeometry {
    groups: usize,
    queries: usize,
    keys: usize,
    dtype: DType,
    budget: usize,
}

impl AttentionGeometry {
    fn new<B: AttentionOps>(
        op: &'static str,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        params: AttentionParams,
        budget: usize,
    ) -> Result<Self> {
        let dims = AttentionDims::new(op, &B::shape(q), &B::shape(k), &B::shape(v), params)?;
        let dtype = B::expect_same_dtype(op, q, k)?;
        B::expect_same_dtype(op, q, v)?;
        Ok(Self { groups: dims.groups, queries: dims.queries, keys: dims.keys, dtype, budget: budget.max(1) })
    }

    /// `(first group, count)` chunks holding at most the budget's scores (at least one group).
    fn group_chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let per_group = self.queries.saturating_mul(self.keys);
        let size = (self.budget / per_group.max(1)).clamp(1, self.groups);
        chunks(self.groups, size)
    }

    /// `(first row, count)` chunks of the queries for a chunk of `gc` groups.
    fn row_chunks(&self, gc: usize) -> impl Iterator<Item = (usize, usize)> {
        let size = (self.budget / gc.saturating_mul(self.keys).max(1)).clamp(1, self.queries);
        chunks(self.queries, size)
    }
}

/// `0..n` in runs of `size` (the last shorter).
fn chunks(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(size).map(move |s| (s, size.min(n - s)))
}
