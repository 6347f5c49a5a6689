//! NCCL all-reduce bandwidth on this machine's GPUs (one thread and one `NcclRank` per GPU,
//! a communicator of all of them, or of one on a single-GPU machine): sizes of a small
//! bucket, lisa's default 25 MiB bucket, and SD 1.5's ControlNet gradient (361 M f32 values).
//! Prints the time per all-reduce, the algorithm bandwidth (bytes / time) and the bus
//! bandwidth (× 2(n−1)/n, NCCL's convention, comparable across GPU counts).
//!
//! `cargo bench -p lisa-cubecl --features cuda --bench allreduce` (scripts/device_check.sh dp).

use std::time::{Duration, Instant};

use lisa_core::backend::{Collective, DType, Shape, TensorOps};
use lisa_cubecl::nccl::{NcclRank, nccl_unique_id};
use lisa_cubecl::{CubeDevice, CudaBackend, CudaDevice};

fn main() {
    let mut devices = Vec::new();
    for index in 0..64 {
        match CubeDevice::try_new(CudaDevice { index }) {
            Ok(d) => devices.push(d),
            Err(_) => break,
        }
    }
    if devices.is_empty() {
        eprintln!("allreduce: no CUDA device here: nothing measured");
        return;
    }
    let id = match nccl_unique_id() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("allreduce: {e}: nothing measured");
            return;
        }
    };
    let world = devices.len();
    let sizes: [(&str, usize); 3] =
        [("1 MiB", 1 << 18), ("25 MiB bucket", 25 << 18), ("SD 1.5 ControlNet", 361_000_000)];
    let rows: Vec<Vec<(usize, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(r, d)| {
                let d = d.clone();
                s.spawn(move || {
                    let mut rank =
                        NcclRank::new(&id, r, world, d.clone(), None, Duration::from_secs(120)).expect("NCCL rank");
                    sizes
                        .iter()
                        .map(|&(_, n)| {
                            let mut x = CudaBackend::full(&Shape::new([n]), 1.0, DType::F32, &d).expect("buffer");
                            rank.all_reduce_sum(&mut x).expect("warm-up all-reduce");
                            let reps = if n > 1 << 26 { 3 } else { 20 };
                            let t = Instant::now();
                            for _ in 0..reps {
                                rank.all_reduce_sum(&mut x).expect("all-reduce");
                            }
                            (n, t.elapsed().as_secs_f64() / reps as f64)
                        })
                        .collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    println!("allreduce: NCCL, {world} GPU(s), f32 sum");
    for (i, (name, _)) in sizes.iter().enumerate() {
        // The slowest rank's time is the collective's.
        let (n, secs) = rows.iter().map(|r| r[i]).fold((0, 0.0f64), |a, b| (b.0, a.1.max(b.1)));
        let bytes = (n * 4) as f64;
        let bus = if world > 1 { 2.0 * (world - 1) as f64 / world as f64 } else { 1.0 };
        println!(
            "allreduce {name:>18}: {:9.3} ms  algbw {:7.1} GB/s  busbw {:7.1} GB/s",
            secs * 1e3,
            bytes / secs / 1e9,
            bytes / secs / 1e9 * bus
        );
    }
}
