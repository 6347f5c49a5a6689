//! Outputs written once: a kernel that writes every element of its output gets the buffer
//! uninitialised, instead of after a zeroing pass it would overwrite anyway (on the toy step
//! those `memset`s were several per cent of the samples).

use std::mem::MaybeUninit;

/// `s` as initialised values.
///
/// # Safety
/// Every element of `s` must have been written.
pub(crate) unsafe fn assume_written(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the caller guarantees initialisation.
    unsafe { &mut *(s as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// A vector of `len` values, all written by `write` (which also returns `R`).
///
/// # Safety
/// `write` must write every element of the slice it is given before returning. (If it
/// panics instead, the vector is dropped empty: nothing uninitialised is ever read.)
pub(crate) unsafe fn written_once<R>(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>]) -> R) -> (Vec<f32>, R) {
    let mut v = Vec::<f32>::with_capacity(len);
    let r = write(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller guarantees that `write` wrote all `len` elements.
    unsafe { v.set_len(len) };
    (v, r)
}
