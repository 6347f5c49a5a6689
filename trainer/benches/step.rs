//! Benchmark of the reference toy configuration (32×32, channels 32/64/64, batch 32):
//! `cargo bench -p lisa-trainer --bench step`. Without `--bench` (under `cargo test
//! --all-targets`) it runs a 2-step smoke version of every arm.
//!
//! Arms (`LISA_BENCH_ARMS=baseline,lisa,...`, default all):
//! - `baseline`, `lisa`, `lisa_sub16`: the ControlNet training step (median of the timed steps),
//! - `pair`: baseline and LISA steps alternated in one process; the median over pairs of
//!   their ratio (the "LISA / own baseline" figure, free of the drift between two runs),
//! - `dp_pair`: LISA steps alone and LISA steps of a data-parallel group of one (NCCL on CUDA,
//!   the in-process transport elsewhere), alternated: what the collective path costs a step,
//! - `parts`: the prior pass (main up path, no grad) and the LISA decoder forward + backward on
//!   their own,
//! - `pretrain`: the prior pretraining step (main network alone, all trainable, EMA),
//! - `sample`: DDIM-25 sampling of 64 images (median of `LISA_BENCH_SAMPLE_REPEATS` full runs,
//!   after a 2-step warm-up run; 2-step runs in the smoke version).
//!
//! Each arm prints its resident memory; run one arm per process (as `scripts/bench/compare.sh`
//! does) and its `peak RSS of arm ...` line is that arm's own peak.
//!
//! Environment: `LISA_BENCH_STEPS=N` (timed steps + 3 warm-up, default 23),
//! `LISA_BENCH_SAMPLE_REPEATS` (default 3), `LISA_BENCH_BACKEND=cpu|wgpu|cuda` (default cpu;
//! the GPU ones need the trainer's `wgpu`/`cuda` feature), `LISA_BENCH_MEMORY_STEPS=N` (one
//! LISA run of N steps printing the resident memory as it goes: flat memory = no leak),
//! `LISA_BENCH_DEFAULT_MALLOC=1` (skip `lisa_cpu::keep_freed_memory`, for comparison),
//! `LISA_BENCH_TF32=1` (CUDA: f32 products on TF32 tensor cores; default exact f32).
#![allow(missing_docs)]

use std::time::Instant;

use lisa_core::backend::prelude::*;
use lisa_core::backend::{Collective, DType, Shape};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::data::{Dataset, FillCircles};
use lisa_trainer::distributed::{DataParallel, thread_group};
use lisa_trainer::model::{Conditioning, ModelSpec, Parts, PromptEmbedding, registry};
use lisa_trainer::pretrain::{PretrainConfig, Pretrainer};
use lisa_trainer::sample::{SampleConfig, sample};
use lisa_trainer::scheduler::NoiseConfig;
use lisa_trainer::train::{Mode, TrainConfig, Trainer};

const ARMS: [&str; 8] = ["baseline", "lisa", "lisa_sub16", "pair", "dp_pair", "parts", "pretrain", "sample"];

/// A data-parallel group of one rank on a device (the collective path with nothing to wait
/// for), or why there is none.
type GroupOfOne<B> =
    fn(&<B as lisa_core::backend::BackendTypes>::Device) -> Result<Box<dyn Collective<B> + Send>, String>;
/// Images per sampling run (the "DDIM-25 sampling of 64 images").
const SAMPLE_IMAGES: usize = 64;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `step` `warm` times untimed, then `timed` times; the median seconds and the resident
/// memory after warm-up and at the end.
fn time_steps(warm: usize, timed: usize, mut step: impl FnMut()) -> (f64, u64, u64) {
    for _ in 0..warm {
        step();
    }
    let rss_after_warmup = rss_kib("VmRSS:");
    let times: Vec<f64> = (0..timed)
        .map(|_| {
            let s = Instant::now();
            step();
            s.elapsed().as_secs_f64()
        })
        .collect();
    (median(times), rss_after_warmup, rss_kib("VmRSS:"))
}

struct Bench<'a, B: Backend> {
    device: B::Device,
    steps: usize,
    sample_repeats: usize,
    /// DDIM steps of a timed sampling run (25; 2 in the smoke version).
    sample_steps: usize,
    data: &'a FillCircles,
    group_of_one: GroupOfOne<B>,
}

impl<B: Backend> Bench<'_, B> {
    fn warm(&self) -> usize {
        3.min(self.steps.saturating_sub(1)) // at least one timed step
    }

    fn trainer(&self, mode: Mode, subbatch: Option<usize>) -> Trainer<B> {
        let model = registry::build::<B>(
            &ModelSpec::default(),
            Parts::Dual { decoder: mode == Mode::Lisa },
            self.device.clone(),
            0,
        )
        .unwrap();
        let config =
            TrainConfig { mode, lisa_subbatch: subbatch, max_train_steps: self.steps as u64, ..TrainConfig::default() };
        Trainer::new(model, config).unwrap()
    }

    /// Baseline and LISA steps alternated in one process (a baseline and a LISA trainer, the
    /// order swapped every pair), so that both see the same machine at the same time: the
    /// median over pairs of `LISA step / baseline step`, and each arm's median step.
    fn paired(&self) -> (f64, f64, f64) {
        self.alternated(self.trainer(Mode::Baseline, None), self.trainer(Mode::Lisa, None))
    }

    /// Steps of `base` and `lisa` alternated (the order swapped every pair): the median over
    /// pairs of `lisa step / base step`, and each one's median step.
    fn alternated(&self, base: Trainer<B>, lisa: Trainer<B>) -> (f64, f64, f64) {
        let (mut base, mut lisa) = (base, lisa);
        let timed = |t: &mut Trainer<B>| {
            let s = Instant::now();
            t.step(self.data).unwrap();
            s.elapsed().as_secs_f64()
        };
        for _ in 0..self.warm() {
            timed(&mut base);
            timed(&mut lisa);
        }
        let (mut ratios, mut b, mut l) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..self.steps - self.warm() {
            let (tb, tl) = if i % 2 == 0 {
                let tb = timed(&mut base);
                (tb, timed(&mut lisa))
            } else {
                let tl = timed(&mut lisa);
                (timed(&mut base), tl)
            };
            ratios.push(tl / tb);
            b.push(tb);
            l.push(tl);
        }
        (median(ratios), median(b), median(l))
    }

    fn control(&self, mode: Mode, subbatch: Option<usize>) -> (f64, u64, u64) {
        let mut t = self.trainer(mode, subbatch);
        // The step reads its loss and the weights' sum of squares back: it ends synchronised.
        time_steps(self.warm(), self.steps - self.warm(), || {
            t.step(self.data).unwrap();
        })
    }

    fn pretrain(&self) -> (f64, u64, u64) {
        let config = PretrainConfig { max_train_steps: self.steps as u64, ..PretrainConfig::default() };
        let mut t = Pretrainer::<B>::new(&ModelSpec::default(), config, self.device.clone()).unwrap();
        time_steps(self.warm(), self.steps - self.warm(), || {
            t.step(self.data).unwrap();
        })
    }

    /// The prior pass and the decoder forward + backward, medians in seconds.
    fn parts(&self, repeats: usize) -> (f64, f64) {
        let model =
            registry::build::<B>(&ModelSpec::default(), Parts::Dual { decoder: true }, self.device.clone(), 0).unwrap();
        let x = B::random_normal(&Shape::new([32, 3, 32, 32]), 1, DType::F32, &self.device).unwrap();
        let cond = Conditioning {
            t: (0..32).map(|i| (i * 31 % 1000) as f32).collect(),
            prompt: PromptEmbedding::Classes(vec![
                (0..32).map(|i| i % 8).collect(),
                (0..32).map(|i| (i + 1) % 8).collect(),
            ]),
        };
        let tape = Tape::<B>::new();
        let b = model.store().bind(&tape);
        let enc = tape.no_grad(|| model.encode_main(&b, &tape.constant(x.clone()), &cond).unwrap());
        B::sync(&self.device).unwrap();
        let prior = median(
            (0..repeats)
                .map(|_| {
                    let s = Instant::now();
                    tape.no_grad(|| model.decode_main(&b, &enc, None).unwrap());
                    B::sync(&self.device).unwrap();
                    s.elapsed().as_secs_f64()
                })
                .collect(),
        );
        let h = B::random_normal(&Shape::new([32, 64, 16, 16]), 2, DType::F32, &self.device).unwrap();
        let dec = median(
            (0..repeats)
                .map(|_| {
                    let tape = Tape::<B>::new();
                    let b = model.store().bind(&tape);
                    let s = Instant::now();
                    let hv = tape.leaf(h.clone());
                    let out = model.decode_lisa(&b, &hv, &cond.t).unwrap();
                    let g = B::full(&B::shape(&out.value), 1e-3, DType::F32, &self.device).unwrap();
                    tape.backward(&[(&out, g)]).unwrap();
                    B::sync(&self.device).unwrap();
                    s.elapsed().as_secs_f64()
                })
                .collect(),
        );
        (prior, dec)
    }

    /// DDIM-25 (the default [`SampleConfig`]) of [`SAMPLE_IMAGES`] images in one batch with the
    /// inference model (no decoder): the median seconds of full runs after a 2-step warm-up.
    fn sample(&self) -> (f64, u64, u64) {
        let model = registry::build::<B>(&ModelSpec::default(), Parts::Dual { decoder: false }, self.device.clone(), 0)
            .unwrap();
        let r = self.data.resolution;
        let mut hints = Vec::with_capacity(SAMPLE_IMAGES * r * r);
        let mut prompts = Vec::with_capacity(SAMPLE_IMAGES);
        for i in 0..SAMPLE_IMAGES {
            let e = self.data.get(i).unwrap();
            hints.extend_from_slice(&e.hint);
            prompts.push(e.prompt);
        }
        let hint = B::from_slice(&hints, &Shape::new([SAMPLE_IMAGES, 1, r, r]), DType::F32, &self.device).unwrap();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let noise = NoiseConfig::default();
        let run = |cfg: &SampleConfig| {
            let x = sample(model.as_ref(), &noise, &hint, &prompts, cfg).unwrap();
            B::to_vec(&x).unwrap(); // the images on the host: what a user of samples needs
        };
        run(&SampleConfig { steps: 2, ..SampleConfig::default() });
        let rss_after_warmup = rss_kib("VmRSS:");
        let times: Vec<f64> = (0..self.sample_repeats.max(1))
            .map(|_| {
                let s = Instant::now();
                run(&SampleConfig { steps: self.sample_steps, ..SampleConfig::default() });
                s.elapsed().as_secs_f64()
            })
            .collect();
        (median(times), rss_after_warmup, rss_kib("VmRSS:"))
    }
}

/// `LISA_BENCH_MEMORY_STEPS=N`: one LISA run of N steps, printing the resident memory every
/// N/10 steps (flat memory = no leak across steps).
fn memory_run<B: Backend>(device: B::Device, steps: usize, data: &FillCircles) {
    let model = registry::build::<B>(&ModelSpec::default(), Parts::Dual { decoder: true }, device, 0).unwrap();
    let mut t = Trainer::new(model, TrainConfig { max_train_steps: steps as u64, ..TrainConfig::default() }).unwrap();
    println!("| step | RSS | peak RSS |\n|---|---|---|");
    for i in 1..=steps {
        t.step(data).unwrap();
        if i % (steps / 10).max(1) == 0 || i == 1 {
            println!("| {i} | {} MiB | {} MiB |", rss_kib("VmRSS:") / 1024, rss_kib("VmHWM:") / 1024);
        }
    }
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn run_arms<B: Backend>(device: B::Device, backend: &str, kept: bool, group_of_one: GroupOfOne<B>) {
    let data = FillCircles { resolution: 32, len: 4096, seed: 0 };
    if let Some(n) = env_usize("LISA_BENCH_MEMORY_STEPS") {
        memory_run::<B>(device, n, &data);
        return;
    }
    let smoke = !std::env::args().any(|a| a == "--bench");
    let steps = env_usize("LISA_BENCH_STEPS").unwrap_or(if smoke { 2 } else { 23 }).max(1);
    let sample_repeats = env_usize("LISA_BENCH_SAMPLE_REPEATS").unwrap_or(if smoke { 1 } else { 3 });
    let arms: Vec<String> = match std::env::var("LISA_BENCH_ARMS") {
        Ok(list) => list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        Err(_) => ARMS.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = arms.iter().find(|a| !ARMS.contains(&a.as_str())) {
        eprintln!("LISA_BENCH_ARMS: unknown arm {bad:?} (known: {})", ARMS.join(", "));
        std::process::exit(2);
    }
    let sample_steps = if smoke { 2 } else { SampleConfig::default().steps };
    let bench = Bench::<B> { device, steps, sample_repeats, sample_steps, data: &data, group_of_one };
    println!(
        "reference toy configuration, batch 32, 32×32, {backend} backend, {} threads, {steps} steps per arm, {}\n",
        rayon::current_num_threads(),
        if kept { "freed memory kept (keep_freed_memory)" } else { "allocator defaults" }
    );
    println!("| arm | median step | RSS after warm-up | RSS at end |");
    println!("|---|---|---|---|");
    let sample_label = format!("DDIM-{sample_steps} sampling of {SAMPLE_IMAGES} images");
    let mut times = std::collections::HashMap::new();
    for arm in &arms {
        let (label, (secs, rss0, rss1)) = match arm.as_str() {
            "baseline" => ("baseline", bench.control(Mode::Baseline, None)),
            "lisa" => ("LISA", bench.control(Mode::Lisa, None)),
            "lisa_sub16" => ("LISA, sub-batch 16", bench.control(Mode::Lisa, Some(16))),
            "pretrain" => ("pretraining step", bench.pretrain()),
            "sample" => (sample_label.as_str(), bench.sample()),
            "dp_pair" => {
                let mut grouped = bench.trainer(Mode::Lisa, None);
                match (bench.group_of_one)(&bench.device) {
                    Ok(group) => {
                        let transport = group.transport();
                        grouped.join(DataParallel::new(group));
                        let (ratio, a, g) = bench.alternated(bench.trainer(Mode::Lisa, None), grouped);
                        times.insert("dp_pair", ratio);
                        println!("| LISA alone, paired | {a:.3} s | - | - |");
                        println!("| LISA in a data-parallel group of one ({transport}), paired | {g:.3} s | - | - |");
                    }
                    Err(why) => println!("| LISA in a data-parallel group of one | not measured: {why} | - | - |"),
                }
                continue;
            }
            "pair" => {
                let (ratio, b, l) = bench.paired();
                times.insert("pair", ratio);
                println!("| baseline, paired with LISA | {b:.3} s | - | - |");
                println!("| LISA, paired with baseline | {l:.3} s | - | - |");
                continue;
            }
            _ => {
                let (prior, dec) = bench.parts(if smoke { 1 } else { 7 });
                times.insert("prior", prior);
                times.insert("decoder", dec);
                println!("| prior pass (main up path, no grad) | {:.1} ms | - | - |", prior * 1e3);
                println!("| LISA decoder (forward + backward) | {:.1} ms | - | - |", dec * 1e3);
                continue;
            }
        };
        times.insert(arm.as_str(), secs);
        println!("| {label} | {secs:.3} s | {} MiB | {} MiB |", rss0 / 1024, rss1 / 1024);
    }
    println!();
    if let (Some(b), Some(l)) = (times.get("baseline"), times.get("lisa")) {
        print!("LISA / baseline = {:.3}", l / b);
        if let Some(h) = times.get("lisa_sub16") {
            print!("; LISA sub-batch 16 / baseline = {:.3}", h / b);
        }
        println!();
    }
    if let Some(r) = times.get("pair") {
        println!("LISA / baseline, paired steps: {r:.3} (median over pairs)");
    }
    if let Some(r) = times.get("dp_pair") {
        println!("LISA in a group of one / alone, paired steps: {r:.3} (median over pairs)");
    }
    if let Some(p) = times.get("prior") {
        println!("prior pass (main up path, no grad): {:.1} ms", p * 1e3);
    }
    if let Some(d) = times.get("decoder") {
        println!("LISA decoder (forward + backward): {:.1} ms", d * 1e3);
    }
    if let Some(s) = times.get("sample") {
        println!("{sample_label}: {s:.3} s");
    }
    if let [arm] = arms.as_slice() {
        println!("peak RSS of arm {arm}: {} MiB", rss_kib("VmHWM:") / 1024);
    }
    println!("peak RSS of the process: {} MiB", rss_kib("VmHWM:") / 1024);
}

/// A group of one rank in this process (the CPU and wgpu backends' transport).
fn threads_of_one<B: Backend>(_: &B::Device) -> Result<Box<dyn Collective<B> + Send>, String> {
    let rank = thread_group(1, std::time::Duration::from_secs(60)).pop().ok_or("no rank")?;
    Ok(Box::new(rank))
}

/// An NCCL communicator of one rank on `device` (the transport of multi-GPU CUDA runs).
#[cfg(feature = "cuda")]
fn nccl_of_one(
    device: &<lisa_cubecl::CudaBackend as lisa_core::backend::BackendTypes>::Device,
) -> Result<Box<dyn Collective<lisa_cubecl::CudaBackend> + Send>, String> {
    use lisa_cubecl::nccl::{NcclRank, nccl_unique_id};
    let id = nccl_unique_id()?;
    Ok(Box::new(NcclRank::new(&id, 0, 1, device.clone(), None, std::time::Duration::from_secs(60))?))
}

fn main() {
    // As the `lisa` command does; LISA_BENCH_DEFAULT_MALLOC=1 measures glibc's defaults instead.
    let kept = std::env::var("LISA_BENCH_DEFAULT_MALLOC").is_err() && lisa_cpu::keep_freed_memory();
    let backend = std::env::var("LISA_BENCH_BACKEND").unwrap_or_else(|_| "cpu".into());
    match backend.as_str() {
        "cpu" => run_arms::<lisa_cpu::CpuBackend>(lisa_cpu::CpuDevice, "CPU", kept, threads_of_one),
        #[cfg(feature = "wgpu")]
        "wgpu" => match lisa_cubecl::WgpuBackend::probe() {
            Ok(d) => run_arms::<lisa_cubecl::WgpuBackend>(d, "wgpu", kept, threads_of_one),
            Err(e) => {
                eprintln!("LISA_BENCH_BACKEND=wgpu: {e}");
                std::process::exit(2);
            }
        },
        #[cfg(feature = "cuda")]
        "cuda" => match lisa_cubecl::CudaBackend::probe() {
            Ok(d) => {
                // LISA_BENCH_TF32=1: f32 products on TF32 tensor cores (default: exact f32).
                let tf32 = std::env::var("LISA_BENCH_TF32").is_ok_and(|v| v == "1");
                lisa_cubecl::set_f32_matmul(if tf32 {
                    lisa_cubecl::F32Matmul::Tf32
                } else {
                    lisa_cubecl::F32Matmul::Exact
                });
                let label = match std::env::var("LISA_CUBECL_F32_GEMM") {
                    Ok(kernel) => format!("CUDA (f32 GEMM kernel {kernel})"),
                    Err(_) if tf32 => "CUDA (TF32 matmul)".to_string(),
                    Err(_) => "CUDA (exact f32 matmul)".to_string(),
                };
                run_arms::<lisa_cubecl::CudaBackend>(d, &label, kept, nccl_of_one)
            }
            Err(e) => {
                eprintln!("LISA_BENCH_BACKEND=cuda: {e}");
                std::process::exit(2);
            }
        },
        other => {
            eprintln!(
                "LISA_BENCH_BACKEND={other}: not built in (cpu always; wgpu and cuda with the trainer's feature of that name)"
            );
            std::process::exit(2);
        }
    }
}
