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
        return Err(Error::invalid(
            op,
            alloc::format!("{len} elements cannot be split into {batch} equal samples"),
        ));
    }
    Ok(len / batch)
}
