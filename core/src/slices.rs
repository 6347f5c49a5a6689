//! Length checks shared by the slice-level math.

use crate::{Error, Result};

/// Checks that every slice has `expected` elements.
pub(crate) fn check_len(op: &'static str, expected: usize, lens: &[usize]) -> Result<()> {
    for &got in lens {
        if got != expected {
            return Err(Error::LengthMismatch { op, expected, got });
        }
    }
    Ok(())
}

/// The number of elements per sample when `len` elements hold `batch` equal samples.
pub(crate) fn per_sample_len(op: &'static str, len: usize, batch: usize) -> Result<usize> {
    if batch == 0 || len == 0 {
        return Err(Error::Empty { op });
    }
    if !len.is_multiple_of(batch) {
        return Err(Error::invalid(op, alloc::format!("{len} elements cannot be split into {batch} equal samples")));
    }
    Ok(len / batch)
}

/// `out[i] = k_b(a[i], c[i])` for a batch of equal samples, with one kernel `k_b` built
/// per sample `b` from `samples[b]` (its noise level, LISA terms, …).
pub(crate) fn map2_per_sample<F: Copy, S, K: Fn(F, F) -> F>(
    op: &'static str,
    samples: &[S],
    a: &[F],
    c: &[F],
    out: &mut [F],
    kernel: impl Fn(&S) -> Result<K>,
) -> Result<()> {
    check_len(op, a.len(), &[c.len(), out.len()])?;
    let per = per_sample_len(op, a.len(), samples.len())?;
    for (b, sample) in samples.iter().enumerate() {
        let k = kernel(sample)?;
        let r = b * per..(b + 1) * per;
        for ((o, &x), &y) in out[r.clone()].iter_mut().zip(&a[r.clone()]).zip(&c[r]) {
            *o = k(x, y);
        }
    }
    Ok(())
}
