//! The lisa-cpu benchmark ops, per cubecl runtime, next to lisa-cpu on the same machine:
//! `cargo bench -p lisa-cubecl --features wgpu` (and/or `cuda`).
//!
//! Prints, per op and shape, the median time (the device synchronised after each run) and
//! the achieved GFLOP/s or GB/s. Without `--bench` on the command line (as under
//! `cargo test --all-targets`) or with `LISA_BENCH_QUICK=1` it runs small shapes once, so
//! the tests keep it working.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use lisa_core::backend::prelude::*;
use lisa_core::backend::{AdamWParams, Conv2dParams, DType, GroupNormParams, Shape, Transpose};

fn quick() -> bool {
    std::env::var_os("LISA_BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// Median seconds of `f` over ≥ 5 runs and ≥ 1 s (after one warm-up run that also
/// compiles the kernels).
fn median_secs(mut f: impl FnMut()) -> f64 {
    f();
    let (min_runs, budget) = if quick() { (1, Duration::ZERO) } else { (5, Duration::from_secs(1)) };
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 30) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn randn<B: Backend>(dims: &[usize], seed: u64, device: &B::Device) -> B::Tensor {
    B::random_normal(&Shape::new(dims), seed, DType::F32, device).expect("random_normal")
}

/// Runs `op` and waits for the device.
fn timed<B: Backend>(device: &B::Device, mut op: impl FnMut()) -> f64 {
    median_secs(|| {
        op();
        B::sync(device).expect("sync");
    })
}

fn row(backend: &str, op: &str, shape: &str, secs: f64, amount: f64, unit: &str) {
    println!("{backend:>6}  {op:<22} {shape:<28} {:>9.3} ms  {:>8.2} {unit}", secs * 1e3, amount / secs / 1e9);
}

fn bench<B: Backend>(device: B::Device) {
    let name = B::name();
    let sizes: &[usize] = if quick() { &[64] } else { &[256, 512, 1024] };
    for &n in sizes {
        let (a, b) = (randn::<B>(&[n, n], 1, &device), randn::<B>(&[n, n], 2, &device));
        let s = timed::<B>(&device, || {
            B::matmul(&a, &b, Transpose::default()).unwrap();
        });
        row(name, "matmul", &format!("{n}^3"), s, 2.0 * (n * n * n) as f64, "GFLOP/s");
    }
    // The UNet's convolutions at batch 32 (16×16 demo resolution and the 32×32 reference).
    let convs: &[[usize; 4]] =
        if quick() { &[[2, 8, 8, 8]] } else { &[[32, 32, 16, 16], [32, 64, 8, 8], [32, 32, 32, 32]] };
    for &[nb, c, h, w] in convs {
        let x = randn::<B>(&[nb, c, h, w], 3, &device);
        let wt = randn::<B>(&[c, c, 3, 3], 4, &device);
        let p = Conv2dParams::same(3);
        let flops = 2.0 * (nb * c * c * 9 * h * w) as f64;
        let shape = format!("[{nb},{c},{h},{w}] k3 -> {c}");
        let y = B::conv2d(&x, &wt, None, p).unwrap();
        let s = timed::<B>(&device, || {
            B::conv2d(&x, &wt, None, p).unwrap();
        });
        row(name, "conv2d forward", &shape, s, flops, "GFLOP/s");
        let s = timed::<B>(&device, || {
            B::conv2d_backward_data(&y, &wt, &B::shape(&x), p).unwrap();
        });
        row(name, "conv2d backward data", &shape, s, flops, "GFLOP/s");
        let s = timed::<B>(&device, || {
            B::conv2d_backward_weight(&x, &y, &B::shape(&wt), p).unwrap();
        });
        row(name, "conv2d backward weight", &shape, s, flops, "GFLOP/s");
    }
    let n = if quick() { 1 << 12 } else { 1 << 22 };
    let x = randn::<B>(&[n], 5, &device);
    let s = timed::<B>(&device, || {
        B::silu(&x).unwrap();
    });
    row(name, "silu", &format!("{n}"), s, (8 * n) as f64, "GB/s");
    let (mut p, mut m, mut v, g) =
        (randn::<B>(&[n], 6, &device), randn::<B>(&[n], 7, &device), randn::<B>(&[n], 8, &device), x.clone());
    let mut hp = AdamWParams::default();
    let s = timed::<B>(&device, || {
        B::adamw_update(&mut p, &mut m, &mut v, &g, &hp).unwrap();
        hp.step += 1;
    });
    row(name, "adamw", &format!("{n} params"), s, (7 * 4 * n) as f64, "GB/s");
    let gn: [usize; 4] = if quick() { [2, 8, 4, 4] } else { [32, 64, 16, 16] };
    let xg = randn::<B>(&gn, 9, &device);
    let (gamma, beta) = (randn::<B>(&[gn[1]], 10, &device), randn::<B>(&[gn[1]], 11, &device));
    let params = GroupNormParams { groups: 8, eps: 1e-5 };
    let s = timed::<B>(&device, || {
        B::group_norm(&xg, &gamma, &beta, params).unwrap();
    });
    let elems: usize = gn.iter().product();
    row(name, "group norm", &format!("{gn:?}"), s, (3 * 4 * elems) as f64, "GB/s");
    launch_overhead::<B>(&device);
}

/// Per-launch cost of tiny ops: `launches` of them back to back and one synchronisation at the
/// end, so the time is the host's and the runtime's cost per launch (the device's work on 1,024
/// values takes microseconds). On a GPU a training step launches ~600 kernels; this says how much
/// of a step that alone can cost, and whether ops that upload a shape table per launch
/// (broadcast add, convolution) cost more than plain element-wise ones.
fn launch_overhead<B: Backend>(device: &B::Device) {
    let name = B::name();
    let launches = if quick() { 4 } else { 400 };
    let x = randn::<B>(&[4, 16, 4, 4], 12, device); // [batch, channels, h, w]: 1,024 values
    let bias = randn::<B>(&[1, 16, 1, 1], 13, device);
    let wt = randn::<B>(&[16, 16, 3, 3], 14, device);
    let (gamma, beta) = (randn::<B>(&[16], 15, device), randn::<B>(&[16], 16, device));
    let p = Conv2dParams::same(3);
    let gp = GroupNormParams { groups: 4, eps: 1e-5 };
    let per_launch = |f: &mut dyn FnMut()| {
        median_secs(|| {
            for _ in 0..launches {
                f();
            }
            B::sync(device).expect("sync");
        }) / launches as f64
    };
    type Op<'a> = (&'static str, Box<dyn FnMut() + 'a>);
    let ops: [Op<'_>; 5] = [
        ("silu", Box::new(|| drop(B::silu(&x).unwrap()))),
        ("add, same shape", Box::new(|| drop(B::add(&x, &x).unwrap()))),
        ("add, broadcast [1,16,1,1]", Box::new(|| drop(B::add(&x, &bias).unwrap()))),
        ("conv2d 3x3 16->16", Box::new(|| drop(B::conv2d(&x, &wt, None, p).unwrap()))),
        ("group norm, 4 groups", Box::new(|| drop(B::group_norm(&x, &gamma, &beta, gp).unwrap()))),
    ];
    for (op, mut f) in ops {
        let s = per_launch(&mut *f);
        println!(
            "{name:>6}  launch: {op:<28} [4,16,4,4] {:>9.1} us per op ({launches} back to back, one sync)",
            s * 1e6
        );
    }
    let one = randn::<B>(&[1], 17, device);
    let s = median_secs(|| drop(B::to_vec(&one).unwrap()));
    println!("{name:>6}  launch: {:<28} [1]        {:>9.1} us per read", "read one value to the host", s * 1e6);
}

fn main() {
    println!("{:>6}  {:<22} {:<28} {:>12}  {:>16}", "device", "op", "shape", "median", "throughput");
    bench::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice);
    #[cfg(feature = "wgpu")]
    match lisa_cubecl::WgpuBackend::probe() {
        Ok(d) => {
            println!("# wgpu adapter: {}", d.runtime_name());
            bench::<lisa_cubecl::WgpuBackend>(d)
        }
        Err(e) => println!("# wgpu skipped: {e}"),
    }
    #[cfg(feature = "cuda")]
    match lisa_cubecl::CudaBackend::probe() {
        Ok(d) => bench::<lisa_cubecl::CudaBackend>(d),
        Err(e) => println!("# cuda skipped: {e}"),
    }
}
