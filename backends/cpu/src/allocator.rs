//! Keeping freed memory for reuse (glibc's allocator settings).
//!
//! A training step frees and re-allocates the same large buffers every step (activations,
//! gradients, im2col scratch, GEMM packing). With glibc's defaults each large buffer is a
//! fresh `mmap`: the kernel zero-fills every page on first touch and unmaps it on free. On the
//! toy step that page-fault work showed in the profiles (`scripts/bench/profile.sh`), and
//! keeping the memory instead made the steps faster at the same peak resident set (see the
//! `lisa-cpu` README for the figures and the machine).

/// Makes this process's allocator keep freed memory for reuse instead of returning it to the
/// system at once: allocations below 256 MiB come from the heap rather than their own
/// mapping, and the heap is trimmed only when more than 1 GiB lies free at its top.
///
/// Process-wide, so it is the program's choice, not the library's: the `lisa` command and the
/// benchmarks call it first thing; an embedding program may too. The peak resident set stays
/// what the work needs (freed memory is reused, not added to); memory freed after the peak is
/// held until reused. A no-op (returning `false`) where the C library is not glibc.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tuning parameters; it is thread-safe
        // (it takes the arena lock) and these values are within the documented ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
