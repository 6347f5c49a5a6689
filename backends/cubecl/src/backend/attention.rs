//! Attention: the fused kernels of `kernels/attention.rs` (forward with the row
//! log-sum-exp; backward in three kernels), never a `[queries, keys]` matrix in memory.
//!
//! Stated fallback: where the kernels' shared memory (`4·16² + 16·max(d, d_v)` floats) does
//! not fit the device's limit (on wgpu's default 16 KiB: `max(d, d_v) > 192`), or the grid
//! exceeds 65 535 tiles or groups, the core's chunked default runs instead (matmul +
//! softmax kernels, at most [`ATTENTION_SCORE_BUDGET`] scores at once): the same results,
//! more memory traffic.

use cubecl::prelude::*;
use lisa_core::Result;
use lisa_core::backend::{
    ATTENTION_SCORE_BUDGET, AttentionDims, AttentionForward, AttentionGrads, AttentionOps, AttentionParams, DType,
    TensorOps, attention_backward_chunked, attention_chunked,
};

use super::{CubeBackend, T, alloc, arg, check_dtype, u32_of};
use crate::device::CubeDevice;
use crate::kernels::attention::{self as k, TILE};
use crate::launch::{grid_1d, with_float};

/// The most cubes along one grid dimension on every runtime.
const MAX_GRID: usize = 65_535;

/// The launch sizes of the fused kernels for one call, or `None` where they do not fit the
/// device (the caller falls back to the chunked default).
#[derive(Debug, Clone, Copy)]
struct FusedLaunch {
    dims: AttentionDims,
    /// `⌈d / TILE⌉`, `⌈d_v / TILE⌉`: the columns each unit accumulates.
    key_cols: u32,
    value_cols: u32,
    /// `max(d, d_v)`: the width of the row tile in shared memory.
    width: u32,
}

impl FusedLaunch {
    fn plan<R: Runtime>(device: &CubeDevice<R>, dims: AttentionDims) -> Option<Self> {
        let width = dims.head_dim.max(dims.value_dim);
        let shared_bytes = k::shared_floats(width) * 4;
        let max_shared = device.client.properties().hardware.max_shared_memory_size;
        let tiles = dims.queries.max(dims.keys).div_ceil(TILE as usize);
        if shared_bytes > max_shared || tiles > MAX_GRID || dims.groups > MAX_GRID {
            return None;
        }
        let t = TILE as usize;
        Some(Self {
            dims,
            key_cols: u32::try_from(dims.head_dim.div_ceil(t)).ok()?,
            value_cols: u32::try_from(dims.value_dim.div_ceil(t)).ok()?,
            width: u32::try_from(width).ok()?,
        })
    }

    /// `(tiles of `rows`, groups)` cubes of `TILE × TILE` units.
    fn grid(&self, rows: usize) -> (CubeCount, CubeDim) {
        let tiles = rows.div_ceil(TILE as usize) as u32;
        (CubeCount::Static(tiles, self.dims.groups as u32, 1), CubeDim::new_2d(TILE, TILE))
    }

    /// `(t_q, t_k, d, d_v)` as kernel arguments.
    fn sizes(&self, op: &'static str) -> Result<(u32, u32, u32, u32)> {
        let d = &self.dims;
        Ok((u32_of(op, d.queries)?, u32_of(op, d.keys)?, u32_of(op, d.head_dim)?, u32_of(op, d.value_dim)?))
    }
}

/// Checks dtypes (all the same, runnable on the device) and shapes; the dims.
fn check_inputs<R: Runtime>(
    op: &'static str,
    q: &T<R>,
    k: &T<R>,
    v: &T<R>,
    params: AttentionParams,
) -> Result<AttentionDims> {
    let dims = AttentionDims::new(op, &q.shape, &k.shape, &v.shape, params)?;
    let dtype = CubeBackend::<R>::expect_same_dtype(op, q, k)?;
    CubeBackend::<R>::expect_same_dtype(op, q, v)?;
    check_dtype(op, &q.device, dtype)?;
    Ok(dims)
}

impl<R: Runtime> CubeBackend<R> {
    /// Whether attention of these sizes runs the fused kernels on `device` (`false`: the
    /// chunked fallback, see the module docs).
    pub fn attention_is_fused(device: &CubeDevice<R>, dims: AttentionDims) -> bool {
        FusedLaunch::plan(device, dims).is_some()
    }
}

impl<R: Runtime> AttentionOps for CubeBackend<R> {
    fn attention_forward(q: &T<R>, k: &T<R>, v: &T<R>, params: AttentionParams) -> Result<AttentionForward<T<R>>> {
        const OP: &str = "attention";
        let dims = check_inputs(OP, q, k, v, params)?;
        let Some(plan) = FusedLaunch::plan(&q.device, dims) else {
            let out = attention_chunked::<Self>(q, k, v, params, ATTENTION_SCORE_BUDGET)?;
            return Ok(AttentionForward { out, lse: None });
        };
        let device = &q.device;
        let out = alloc(device, dims.out_shape(), q.dtype)?;
        let lse = alloc(device, dims.lse_shape(), DType::F32)?;
        let (tq, tk, d, dv) = plan.sizes(OP)?;
        let (count, dim) = plan.grid(dims.queries);
        with_float!(q.dtype, F => k::attention_forward::launch::<F, R>(
            &device.client, count, dim, arg(q), arg(k), arg(v), arg(&out), arg(&lse),
            tq, tk, d, dv, params.scale, u32::from(params.causal), TILE, plan.value_cols, plan.width
        ));
        Ok(AttentionForward { out, lse: Some(lse) })
    }

    fn attention_backward(
        q: &T<R>,
        k: &T<R>,
        v: &T<R>,
        forward: &AttentionForward<T<R>>,
        grad_out: &T<R>,
        params: AttentionParams,
    ) -> Result<AttentionGrads<T<R>>> {
        const OP: &str = "attention_backward";
        let dims = check_inputs(OP, q, k, v, params)?;
        Self::expect_same_dtype(OP, q, grad_out)?;
        Self::expect_same_dtype(OP, q, &forward.out)?;
        let Some(plan) = FusedLaunch::plan(&q.device, dims) else {
            return attention_backward_chunked::<Self>(q, k, v, grad_out, params, ATTENTION_SCORE_BUDGET);
        };
        let lse = match &forward.lse {
            Some(lse) => Self::cast(lse, DType::F32)?,
            // A forward from the chunked path: its statistics, recomputed once.
            None => match Self::attention_forward(q, k, v, params)?.lse {
                Some(lse) => lse,
                None => return attention_backward_chunked::<Self>(q, k, v, grad_out, params, ATTENTION_SCORE_BUDGET),
            },
        };
        dims.check_backward(OP, &forward.out.shape, &lse.shape, &grad_out.shape)?;
        let device = &q.device;
        let delta = alloc(device, dims.lse_shape(), DType::F32)?;
        let (dq, dk, dv) = (
            alloc(device, q.shape.clone(), q.dtype)?,
            alloc(device, k.shape.clone(), q.dtype)?,
            alloc(device, v.shape.clone(), q.dtype)?,
        );
        let (tq, tk, d, dvw) = plan.sizes(OP)?;
        let causal = u32::from(params.causal);
        with_float!(q.dtype, F => {
            let (count, dim) = grid_1d(delta.len());
            k::attention_delta::launch::<F, R>(&device.client, count, dim, arg(&forward.out), arg(grad_out), arg(&delta), dvw);
            let (count, dim) = plan.grid(dims.keys);
            k::attention_backward_kv::launch::<F, R>(
                &device.client, count, dim, arg(q), arg(k), arg(v), arg(grad_out), arg(&lse), arg(&delta),
                arg(&dk), arg(&dv), tq, tk, d, dvw, params.scale, causal,
                TILE, plan.key_cols, plan.value_cols, plan.width
            );
            let (count, dim) = plan.grid(dims.queries);
            k::attention_backward_q::launch::<F, R>(
                &device.client, count, dim, arg(q), arg(k), arg(v), arg(grad_out), arg(&lse), arg(&delta),
                arg(&dq), tq, tk, d, dvw, params.scale, causal, TILE, plan.key_cols, plan.width
            );
        });
        Ok(AttentionGrads { q: dq, k: dk, v: dv })
    }
}
