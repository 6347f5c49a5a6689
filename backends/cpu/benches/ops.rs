//! CPU backend benchmarks: `cargo bench -p lisa-cpu`.
//!
//! Prints, per op and shape, the median time over repeated runs, the achieved GFLOP/s (or
//! GB/s for memory-bound ops) and its share of this machine's peak, which the bench measures
//! itself: peak f32 FMA throughput with an FMA loop on every core, and memory bandwidth
//! with a multi-threaded copy. Set `LISA_BENCH_QUICK=1` for a fast smoke run; without
//! `--bench` on the command line (i.e. under `cargo test --all-targets`) it also runs quick,
//! so the tests keep the benchmark working without spending minutes on it.
//! `LISA_BENCH_SD_ROWS=1` runs only SD 1.5's widest decoder convolutions instead (batch 1).
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use lisa_core::backend::prelude::*;
use lisa_core::backend::{AdamWParams, Conv2dParams, DType, GroupNormParams, Shape, Transpose};
use lisa_cpu::{CpuBackend as C, CpuDevice, CpuTensor};
use rayon::prelude::*;

fn quick() -> bool {
    std::env::var_os("LISA_BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// Median seconds of `f` over ≥ 5 runs and ≥ 0.5 s (after one warm-up run).
fn median_secs(mut f: impl FnMut()) -> f64 {
    f();
    let (min_runs, budget) = if quick() { (2, Duration::from_millis(50)) } else { (5, Duration::from_millis(500)) };
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 50) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

// ---------------------------------------------------------------- machine peaks

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// 12 independent 8-lane FMA chains; returns a value so the loop is not removed.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2_loop(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0.0f32; 8];
        let sum = acc.iter().fold(_mm256_set1_ps(0.0), |s, &v| _mm256_add_ps(s, v));
        // SAFETY: `out` holds exactly 8 f32, the width of one __m256 store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// 12 independent 16-lane FMA chains (AVX-512F).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512_loop(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let sum = acc.iter().fold(_mm512_set1_ps(0.0), |s, &v| _mm512_add_ps(s, v));
        _mm512_reduce_add_ps(sum)
    }
}

/// Peak f32 GFLOP/s: the FMA loop on every core at once, best of 3. Returns (GFLOP/s, ISA).
fn measure_peak_gflops() -> (f64, &'static str) {
    let threads = rayon::current_num_threads();
    let iters: u64 = if quick() { 2_000_000 } else { 20_000_000 };
    #[cfg(target_arch = "x86_64")]
    {
        let (lanes, isa): (u64, &str) = if is_x86_feature_detected!("avx512f") {
            (16, "AVX-512 FMA")
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            (8, "AVX2 FMA")
        } else {
            return (f64::NAN, "no FMA");
        };
        let best = (0..3)
            .map(|_| {
                let t = Instant::now();
                let s: f32 = (0..threads)
                    .into_par_iter()
                    .map(|_| {
                        // SAFETY: the required CPU features were detected just above.
                        unsafe { if lanes == 16 { fma::avx512_loop(iters) } else { fma::avx2_loop(iters) } }
                    })
                    .sum();
                black_box(s);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let flops = threads as f64 * iters as f64 * 12.0 * lanes as f64 * 2.0;
        (flops / best / 1e9, isa)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (f64::NAN, "unmeasured")
    }
}

/// Memory bandwidth (GB/s, read + write) of a parallel copy of 256 MiB.
fn measure_bandwidth() -> f64 {
    let n = if quick() { 1 << 22 } else { 1 << 26 };
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let secs = median_secs(|| {
        dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
        black_box(&dst);
    });
    2.0 * 4.0 * n as f64 / secs / 1e9
}

// ---------------------------------------------------------------- helpers

fn randn(shape: &[usize], seed: u64) -> CpuTensor {
    C::random_normal(&Shape::new(shape), seed, DType::F32, &CpuDevice).expect("randn")
}

struct Report {
    peak_gflops: f64,
    bandwidth: f64,
}

impl Report {
    fn compute(&self, name: &str, shape: &str, flops: f64, secs: f64) {
        let g = flops / secs / 1e9;
        println!(
            "| {name} | {shape} | {:.3} | {g:.1} GFLOP/s | {:.0}% of peak |",
            secs * 1e3,
            100.0 * g / self.peak_gflops
        );
    }
    fn memory(&self, name: &str, shape: &str, bytes: f64, secs: f64) {
        let b = bytes / secs / 1e9;
        println!(
            "| {name} | {shape} | {:.3} | {b:.1} GB/s | {:.0}% of copy bandwidth |",
            secs * 1e3,
            100.0 * b / self.bandwidth
        );
    }
}

fn main() {
    let threads = rayon::current_num_threads();
    let (peak, isa) = measure_peak_gflops();
    let bandwidth = measure_bandwidth();
    let r = Report { peak_gflops: peak, bandwidth };
    println!(
        "lisa-cpu benchmarks: {threads} threads; measured peak {peak:.1} GFLOP/s ({isa}); copy bandwidth {bandwidth:.1} GB/s\n"
    );
    println!("| op | shape | median ms | rate | share |");
    println!("|---|---|---|---|---|");

    let sizes: &[usize] = if quick() { &[64, 256] } else { &[64, 128, 256, 512, 1024] };
    for &n in sizes {
        let (a, b) = (randn(&[n, n], 1), randn(&[n, n], 2));
        let secs = median_secs(|| {
            black_box(C::matmul(&a, &b, Transpose::default()).unwrap());
        });
        r.compute("gemm", &format!("{n}³"), 2.0 * (n as f64).powi(3), secs);
    }

    // The trainer's UNet shapes: batch 32, 32×32 / 16×16 / 8×8 maps, 32..128 channels, 3×3,
    // and the output convolution to 3 image channels.
    let batch = if quick() { 4 } else { 32 };
    let conv_shapes = [
        (32usize, 32usize, 32usize),
        (96, 32, 32),
        (64, 64, 16),
        (128, 64, 16),
        (64, 64, 8),
        (128, 128, 8),
        (32, 3, 32),
    ];
    let p = Conv2dParams::same(3);
    for (c_in, c_out, hw) in conv_shapes {
        let x = randn(&[batch, c_in, hw, hw], 3);
        let w = randn(&[c_out, c_in, 3, 3], 4);
        let y = C::conv2d(&x, &w, None, p).unwrap();
        let flops = 2.0 * (batch * c_out * hw * hw * c_in * 9) as f64;
        let label = format!("[{batch},{c_in},{hw},{hw}]→{c_out}");
        r.compute(
            "conv2d fwd",
            &label,
            flops,
            median_secs(|| {
                black_box(C::conv2d(&x, &w, None, p).unwrap());
            }),
        );
        r.compute(
            "conv2d bwd data",
            &label,
            flops,
            median_secs(|| {
                black_box(C::conv2d_backward_data(&y, &w, &C::shape(&x), p).unwrap());
            }),
        );
        r.compute(
            "conv2d bwd weight",
            &label,
            flops,
            median_secs(|| {
                black_box(C::conv2d_backward_weight(&x, &y, &C::shape(&w), p).unwrap());
            }),
        );
    }

    // A decoder ResBlock's 1×1 skip convolution (after the concat): a plain GEMM per image.
    for (c_in, c_out, hw) in [(96usize, 32usize, 32usize), (128, 64, 16)] {
        let x = randn(&[batch, c_in, hw, hw], 3);
        let w = randn(&[c_out, c_in, 1, 1], 4);
        let p1 = Conv2dParams { stride: [1, 1], padding: [0, 0] };
        let flops = 2.0 * (batch * c_out * hw * hw * c_in) as f64;
        r.compute(
            "conv2d 1×1 fwd",
            &format!("[{batch},{c_in},{hw},{hw}]→{c_out}"),
            flops,
            median_secs(|| {
                black_box(C::conv2d(&x, &w, None, p1).unwrap());
            }),
        );
    }

    // `LISA_BENCH_SD_ROWS=1`: only SD 1.5's decoder convolutions after a concat, batch 1 (the
    // widest layers of its up path; minutes, not part of the default run).
    if std::env::var_os("LISA_BENCH_SD_ROWS").is_some() {
        let sd = [(640usize, 320usize, 64usize), (960, 320, 64), (1920, 1280, 16), (2560, 1280, 8)];
        for (c_in, c_out, hw) in sd {
            let (x, w) = (randn(&[1, c_in, hw, hw], 3), randn(&[c_out, c_in, 3, 3], 4));
            let p = Conv2dParams::same(3);
            let y = C::conv2d(&x, &w, None, p).unwrap();
            let flops = 2.0 * (c_out * hw * hw * c_in * 9) as f64;
            let label = format!("[1,{c_in},{hw},{hw}]→{c_out}");
            let (xs, ws) = (C::shape(&x), C::shape(&w));
            r.compute("SD conv2d fwd", &label, flops, median_secs(|| drop(black_box(C::conv2d(&x, &w, None, p)))));
            let data = median_secs(|| drop(black_box(C::conv2d_backward_data(&y, &w, &xs, p))));
            r.compute("SD conv2d bwd data", &label, flops, data);
            let weight = median_secs(|| drop(black_box(C::conv2d_backward_weight(&x, &y, &ws, p))));
            r.compute("SD conv2d bwd weight", &label, flops, weight);
        }
        return;
    }

    // The UNet's Upsample blocks (nearest ×2, then 3×3 at the doubled size), as the one op
    // (sub-pixel kernels on the low-resolution input) and as the two ops it replaces. Rates
    // count the upsampled convolution's FLOPs for both, so they compare as times do.
    for (c, hw) in [(64usize, 8usize), (64, 16)] {
        let x = randn(&[batch, c, hw, hw], 3);
        let w = randn(&[c, c, 3, 3], 4);
        let y = C::upsample_conv2d(&x, &w, None).unwrap();
        let up = C::upsample_nearest(&x, 2).unwrap();
        let flops = 2.0 * (batch * c * 4 * hw * hw * c * 9) as f64;
        let label = format!("[{batch},{c},{hw},{hw}]→×2→{c}");
        let fused = [
            median_secs(|| drop(black_box(C::upsample_conv2d(&x, &w, None).unwrap()))),
            median_secs(|| drop(black_box(C::upsample_conv2d_backward_data(&y, &w, &C::shape(&x)).unwrap()))),
            median_secs(|| drop(black_box(C::upsample_conv2d_backward_weight(&x, &y, &C::shape(&w)).unwrap()))),
        ];
        let two_ops = [
            median_secs(|| drop(black_box(C::conv2d(&C::upsample_nearest(&x, 2).unwrap(), &w, None, p).unwrap()))),
            median_secs(|| {
                let d_up = C::conv2d_backward_data(&y, &w, &C::shape(&up), p).unwrap();
                drop(black_box(C::upsample_nearest_backward(&d_up, 2).unwrap()));
            }),
            median_secs(|| {
                let up = C::upsample_nearest(&x, 2).unwrap();
                drop(black_box(C::conv2d_backward_weight(&up, &y, &C::shape(&w), p).unwrap()));
            }),
        ];
        for (k, what) in ["fwd", "bwd data", "bwd weight"].iter().enumerate() {
            r.compute(&format!("upsample conv {what}"), &label, flops, fused[k]);
            r.compute(&format!("upsample, conv {what}"), &label, flops, two_ops[k]);
        }
    }

    let (c, hw) = (64usize, 16usize);
    let x = randn(&[batch, c, hw, hw], 5);
    let (gamma, beta) = (randn(&[c], 6), randn(&[c], 7));
    let gn = GroupNormParams { groups: 8, eps: 1e-5 };
    let bytes = 4.0 * x_len(&x) as f64;
    let label = format!("[{batch},{c},{hw},{hw}]/8");
    r.memory(
        "group norm fwd",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::group_norm(&x, &gamma, &beta, gn).unwrap());
        }),
    );
    let stats = C::group_norm(&x, &gamma, &beta, gn).unwrap();
    r.memory(
        "group norm bwd",
        &label,
        3.0 * bytes,
        median_secs(|| {
            black_box(C::group_norm_backward(&x, &gamma, &stats, &x, gn).unwrap());
        }),
    );
    r.memory(
        "group norm + silu fused",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::group_norm_silu(&x, &gamma, &beta, gn).unwrap());
        }),
    );
    r.memory(
        "group norm, then silu",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::silu(&C::group_norm(&x, &gamma, &beta, gn).unwrap().output).unwrap());
        }),
    );
    let fused_stats = C::group_norm_silu(&x, &gamma, &beta, gn).unwrap();
    r.memory(
        "group norm + silu fused bwd",
        &label,
        3.0 * bytes,
        median_secs(|| {
            black_box(C::group_norm_silu_backward(&x, &gamma, &beta, &fused_stats, &x, gn).unwrap());
        }),
    );
    r.memory(
        "silu bwd, then group norm bwd",
        &label,
        3.0 * bytes,
        median_secs(|| {
            let dz = C::silu_backward(&stats.output, &x).unwrap();
            black_box(C::group_norm_backward(&x, &gamma, &stats, &dz, gn).unwrap());
        }),
    );
    r.memory(
        "silu",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::silu(&x).unwrap());
        }),
    );
    r.memory(
        "square",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::unary(lisa_core::backend::UnaryOp::Square, &x).unwrap());
        }),
    );
    r.memory(
        "silu backward",
        &label,
        3.0 * bytes,
        median_secs(|| {
            black_box(C::silu_backward(&x, &x).unwrap());
        }),
    );
    r.memory(
        "add",
        &label,
        3.0 * bytes,
        median_secs(|| {
            black_box(C::add(&x, &x).unwrap());
        }),
    );
    // One value per plane (a ResBlock's time-embedding add).
    let per_plane = randn(&[batch, c, 1, 1], 6);
    r.memory(
        "add, one value per plane",
        &label,
        2.0 * bytes,
        median_secs(|| {
            black_box(C::add(&x, &per_plane).unwrap());
        }),
    );

    let n = if quick() { 1 << 18 } else { 2_000_000 };
    let (mut p_, mut m, mut v) = (
        randn(&[n], 8),
        C::zeros(&Shape::new([n]), DType::F32, &CpuDevice).unwrap(),
        C::zeros(&Shape::new([n]), DType::F32, &CpuDevice).unwrap(),
    );
    let g = randn(&[n], 9);
    let mut step = 0;
    // AdamW reads p, m, v, g and writes p, m, v.
    r.memory(
        "adamw",
        &format!("{n} params"),
        7.0 * 4.0 * n as f64,
        median_secs(|| {
            step += 1;
            C::adamw_update(&mut p_, &mut m, &mut v, &g, &AdamWParams { step, ..AdamWParams::default() }).unwrap();
        }),
    );
}

fn x_len(t: &CpuTensor) -> usize {
    t.len()
}
