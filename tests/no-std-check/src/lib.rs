//! Built by `scripts/test.sh` as a `staticlib` (panic = "abort"):
//! `cargo build --release --manifest-path tests/no-std-check/Cargo.toml`.
//!
//! It defines `#[panic_handler]`, so if `std` reaches the crate graph through `lisa-core`
//! or any of its dependencies, the build fails with "duplicate lang item `panic_impl`".
//! It also defines the global allocator, so `alloc` works with nothing from the OS.
#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

use lisa_core::lisa::{SampleTerms, lisa_loss_fused};
use lisa_core::schedule::{BetaSchedule, DiscreteVp};
use lisa_core::{LisaConfig, Prediction};

/// A bump allocator over a static arena (never frees): enough for this proof.
struct Bump {
    arena: UnsafeCell<[u8; ARENA]>,
    next: AtomicUsize,
}

const ARENA: usize = 1 << 20;

// SAFETY: the arena is only handed out in disjoint ranges reserved by an atomic
// fetch_add below, so concurrent callers never receive overlapping memory.
unsafe impl Sync for Bump {}

// SAFETY: `alloc` returns either null or a pointer to `layout.size()` bytes inside the
// arena, aligned to `layout.align()`, never handed out twice; `dealloc` is a no-op.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.arena.get() as usize;
        let mut start = 0;
        let reserved = self
            .next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
                let aligned = (base + next).next_multiple_of(layout.align()) - base;
                start = aligned;
                let end = aligned.checked_add(layout.size())?;
                (end <= ARENA).then_some(end)
            });
        match reserved {
            Ok(_) => (base + start) as *mut u8,
            Err(_) => core::ptr::null_mut(),
        }
    }
    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOCATOR: Bump = Bump {
    arena: UnsafeCell::new([0; ARENA]),
    next: AtomicUsize::new(0),
};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The LISA term of `n` elements at DDPM step `t` (ε-prediction), with `grad` written;
/// returns NaN on any error. A C-callable entry point so the staticlib exports something.
///
/// # Safety
/// `decoded`, `y`, `prior` must point to `n` readable `f32`s and `grad` to `n` writable ones.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lisa_no_std_loss(
    decoded: *const f32,
    y: *const f32,
    prior: *const f32,
    grad: *mut f32,
    n: usize,
    t: usize,
) -> f32 {
    // SAFETY: the caller guarantees the four pointers are valid for `n` elements.
    let (d, y, p, g) = unsafe {
        (
            core::slice::from_raw_parts(decoded, n),
            core::slice::from_raw_parts(y, n),
            core::slice::from_raw_parts(prior, n),
            core::slice::from_raw_parts_mut(grad, n),
        )
    };
    let mut run = || -> lisa_core::Result<f32> {
        let schedule = DiscreteVp::<f32>::new(BetaSchedule::DDPM_LINEAR, 1000)?;
        let config = LisaConfig::default();
        let terms: SampleTerms<f32> =
            config.sample_terms(Prediction::Epsilon, schedule.level(t)?)?;
        Ok(lisa_loss_fused(&config, &[terms], d, y, p, g)?.weighted)
    };
    run().unwrap_or(f32::NAN)
}
