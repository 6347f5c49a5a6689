//! What the host-memory transports share: the sum in rank order (the same bits on every
//! rank, whatever the arrival order) and the round trip of a device tensor through it.

use lisa_core::backend::Backend;

/// `Σ_r parts[r]`, added in rank order: `((p₀ + p₁) + p₂) + …`.
pub(crate) fn sum_in_rank_order(parts: &[Vec<f32>]) -> Result<Vec<f32>, String> {
    let Some((first, rest)) = parts.split_first() else {
        return Ok(Vec::new());
    };
    let mut sum = first.clone();
    for (r, p) in rest.iter().enumerate() {
        if p.len() != sum.len() {
            return Err(format!(
                "rank 0 reduces {} values but rank {} reduces {} (the ranks run different models or settings)",
                sum.len(),
                r + 1,
                p.len()
            ));
        }
        sum.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
    Ok(sum)
}

/// `x ← reduce(x's values)`, through host memory, in `x`'s shape and dtype.
pub(crate) fn reduce_through_host<B: Backend>(
    x: &mut B::Tensor,
    reduce: impl FnOnce(Vec<f32>) -> Result<Vec<f32>, String>,
) -> lisa_core::Result<()> {
    let values = B::to_vec(x)?;
    let n = values.len();
    let sum = reduce(values).map_err(|message| lisa_core::Error::Backend { op: "all_reduce", message })?;
    if sum.len() != n {
        return Err(lisa_core::Error::LengthMismatch { op: "all_reduce", expected: n, got: sum.len() });
    }
    *x = B::from_slice(&sum, &B::shape(x), B::dtype(x), &B::device(x))?;
    Ok(())
}
