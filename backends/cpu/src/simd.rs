//! Which vector instructions the loop kernels are compiled for, chosen at run time.
//!
//! lisa-cpu is built for the baseline x86-64 target (so one binary runs everywhere); its
//! element-wise, normalisation and reduction loops are plain Rust that LLVM vectorises. To use
//! the CPU's wider registers, [`vectorised`] runs a kernel body inside a function compiled with
//! more target features: AVX-512 (16 `f32` lanes) where the CPU has the x86-64-v4 set, else
//! AVX2 + FMA (8 lanes), else the baseline (SSE2, 4 lanes). The body is inlined into each of
//! these functions, so every tier is the same source loop.
//!
//! Same numbers on every tier: the kernels' arithmetic is element by element, and their sums
//! keep a fixed number of partial sums added in a fixed order (`sums.rs`); Rust does not fuse
//! `a·b + c` into an FMA or reassociate float sums on its own, so a wider register changes
//! how many elements one instruction handles, never a result (`tests/determinism.rs` runs the
//! ops under every tier the CPU has and compares the bits).
//!
//! `LISA_CPU_ISA=avx2` or `=baseline` (read once), or [`set_isa_cap`], caps the tier: for
//! comparing tiers within one machine and one binary. The `gemm` crate dispatches its own
//! kernels and is not affected.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set tier for the loop kernels, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The build target's baseline (SSE2 on x86-64; whatever the target has elsewhere).
    Baseline,
    /// AVX2 and FMA (x86-64-v3's vector part).
    Avx2,
    /// AVX-512 F, VL, DQ and BW (x86-64-v4's vector part).
    Avx512,
}

impl Isa {
    /// The name `LISA_CPU_ISA` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            2 => Isa::Avx2,
            3 => Isa::Avx512,
            _ => Isa::Baseline,
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Baseline => 1,
            Isa::Avx2 => 2,
            Isa::Avx512 => 3,
        }
    }
}

/// The widest tier this CPU supports.
pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Baseline
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Baseline
    }
}

/// 0: not decided yet; else [`Isa::code`] of the tier in use.
static IN_USE: AtomicU8 = AtomicU8::new(0);

/// Caps the tier the loop kernels use at `cap` (never above what the CPU has); returns the
/// tier now in use. Process-wide; results do not change with the tier, only speed does.
pub fn set_isa_cap(cap: Isa) -> Isa {
    let isa = cap.min(detected_isa());
    IN_USE.store(isa.code(), Ordering::Relaxed);
    isa
}

/// The tier the loop kernels use: the detected one, capped by `LISA_CPU_ISA` or
/// [`set_isa_cap`]. An unknown `LISA_CPU_ISA` value is ignored with a warning on stderr.
pub fn isa() -> Isa {
    match IN_USE.load(Ordering::Relaxed) {
        0 => {
            let cap = match std::env::var("LISA_CPU_ISA").as_deref() {
                Err(_) => Isa::Avx512,
                Ok("avx512") => Isa::Avx512,
                Ok("avx2") => Isa::Avx2,
                Ok("baseline") => Isa::Baseline,
                Ok(other) => {
                    eprintln!("LISA_CPU_ISA={other:?} is not avx512, avx2 or baseline: ignored");
                    Isa::Avx512
                }
            };
            let isa = cap.min(detected_isa());
            // A concurrent `set_isa_cap` wins over the environment's default.
            match IN_USE.compare_exchange(0, isa.code(), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => isa,
                Err(code) => Isa::from_code(code),
            }
        }
        code => Isa::from_code(code),
    }
}

/// Runs `f` compiled for the tier in use ([`isa`]): `f` (a closure called once) is inlined
/// into a function with that tier's target features, so its loops vectorise that wide.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: `isa()` never exceeds `detected_isa()`, which checked these features.
        Isa::Avx512 => return unsafe { with_avx512(f) },
        // SAFETY: as above, AVX2 and FMA are present.
        Isa::Avx2 => return unsafe { with_avx2(f) },
        Isa::Baseline => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
