//! Data-parallel training without a GPU: N ranks as threads of this process (the in-process
//! collective), each with its share of the global batch, against one rank with the whole
//! batch; resume, rank-0 duties, failures and timeouts; the launchers' variables and the TCP
//! rendezvous between "processes" (threads with their own sockets).

mod common;

use std::time::{Duration, Instant};

use common::{on_threads, tiny_model};
use lisa_core::backend::DType;
use lisa_core::backend::prelude::*;
use lisa_core::tolerance::{DATA_PARALLEL_LOSS_F32, DATA_PARALLEL_PARAMS_F32};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::data::FillCircles;
use lisa_trainer::distributed::{DataParallel, Launch, Launcher, TcpRank, buckets, rendezvous, thread_group};
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::session::{self, CheckpointPolicy, ResumeFrom, RunOptions};
use lisa_trainer::train::{Mode, StepStats, TrainConfig, Trainer};

const DATA: FillCircles = FillCircles { resolution: 16, len: 64, seed: 7 };

fn config(batch: usize, accum: usize, steps: u64) -> TrainConfig {
    TrainConfig {
        seed: 11,
        batch_size: batch,
        gradient_accumulation_steps: accum,
        max_train_steps: steps,
        mode: Mode::Lisa,
        proportion_empty_prompts: 0.25,
        optim: OptimConfig { lr: 2e-3, ..OptimConfig::default() },
        ..TrainConfig::default()
    }
}

fn trainer(cfg: TrainConfig) -> Trainer<C> {
    let model = registry::build::<C>(&tiny_model(), Parts::Dual { decoder: true }, CpuDevice, cfg.seed).unwrap();
    Trainer::new(model, cfg).unwrap()
}

/// Trained weights, by name.
type Weights = Vec<(String, Vec<f32>)>;

/// The trained weights, by name.
fn trained(t: &Trainer<C>) -> Weights {
    t.model
        .store()
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(_, p)| (p.name.clone(), C::to_vec(&p.value).unwrap()))
        .collect()
}

/// What a rank ended with: its steps, its trained weights, its stream position, its rank.
struct Ended {
    stats: Vec<StepStats>,
    weights: Vec<(String, Vec<f32>)>,
    state: lisa_trainer::train::TrainState,
    rank: usize,
}

/// `world` ranks of batch `batch` stepping `steps` times; every rank's stats and weights.
fn ranks(world: usize, cfg: TrainConfig) -> Vec<Ended> {
    on_threads(thread_group(world, Duration::from_secs(60)), |_, rank| {
        let mut t = trainer(cfg.clone());
        t.join(DataParallel::new(Box::new(rank)));
        t.check_ranks_agree().unwrap();
        let stats: Vec<StepStats> = (0..t.config.max_train_steps).map(|_| t.step(&DATA).unwrap()).collect();
        Ended { stats, weights: trained(&t), state: t.run.state, rank: t.shard().rank }
    })
}

fn assert_matches(alone: &[StepStats], alone_w: &[(String, Vec<f32>)], stats: &[StepStats], w: &[(String, Vec<f32>)]) {
    let mut worst_loss = 0f64;
    for (a, b) in alone.iter().zip(stats) {
        for (x, y) in
            [(a.loss, b.loss), (a.main_loss, b.main_loss), (a.lisa_loss, b.lisa_loss), (a.grad_norm, b.grad_norm)]
        {
            assert!(DATA_PARALLEL_LOSS_F32.accepts(y as f64, x as f64), "step {}: {y} vs {x} alone", a.step);
            worst_loss = worst_loss.max(((y - x) / x).abs() as f64);
        }
    }
    let mut worst_w = 0f64;
    for ((name, a), (_, b)) in alone_w.iter().zip(w) {
        for (x, y) in a.iter().zip(b) {
            assert!(DATA_PARALLEL_PARAMS_F32.accepts(*y as f64, *x as f64), "{name}: {y} vs {x} alone");
            worst_w = worst_w.max((y - x).abs() as f64);
        }
    }
    eprintln!("worst relative loss difference {worst_loss:.2e}, worst weight difference {worst_w:.2e}");
}

#[test]
fn two_ranks_train_as_one_rank_with_the_global_batch() {
    // One rank, batch 4, accumulation 2 vs two ranks of batch 2: the same examples, timesteps,
    // null prompts and noise rows, so the same steps up to the gradients' summation order.
    let mut alone = trainer(config(4, 2, 4));
    let alone_stats: Vec<StepStats> = (0..4).map(|_| alone.step(&DATA).unwrap()).collect();
    let ranks = ranks(2, config(2, 2, 4));
    for e in &ranks {
        // Every rank ends identical (the same averaged gradients, the same AdamW), bit for bit.
        assert_eq!(e.weights, ranks[0].weights, "rank {} differs from rank 0", e.rank);
        assert_eq!(e.state.ranks, 2);
        let as_alone = lisa_trainer::train::TrainState { ranks: 1, ..e.state };
        assert_eq!(as_alone, alone.run.state, "the stream's position is the global batch's");
        assert_matches(&alone_stats, &trained(&alone), &e.stats, &e.weights);
    }
}

#[test]
fn four_ranks_train_as_one_rank_with_the_global_batch() {
    let mut alone = trainer(config(4, 1, 3));
    let alone_stats: Vec<StepStats> = (0..3).map(|_| alone.step(&DATA).unwrap()).collect();
    let ranks = ranks(4, config(1, 1, 3));
    for e in &ranks {
        assert_matches(&alone_stats, &trained(&alone), &e.stats, &e.weights);
    }
}

#[test]
fn a_group_of_one_is_the_run_alone_bit_for_bit() {
    let mut alone = trainer(config(2, 1, 2));
    let alone_stats: Vec<StepStats> = (0..2).map(|_| alone.step(&DATA).unwrap()).collect();
    let ranks = ranks(1, config(2, 1, 2));
    assert_eq!(ranks[0].stats, alone_stats);
    assert_eq!(ranks[0].weights, trained(&alone));
}

#[test]
fn buckets_follow_the_backward_order_and_cap() {
    // Slots of 10, 30, 20, 5 bytes, cap 32: reverse order, a slot over the cap alone.
    assert_eq!(buckets(&[10, 30, 20, 5], 32), vec![vec![3, 2], vec![1], vec![0]]);
    assert_eq!(buckets(&[10, 40, 5], 32), vec![vec![2], vec![1], vec![0]]);
    assert_eq!(buckets(&[1, 1, 1], 1 << 20), vec![vec![2, 1, 0]]);
    // Small buckets: the same averaged training as one bucket.
    let results = on_threads(thread_group(2, Duration::from_secs(60)), |_, rank| {
        let mut t = trainer(config(2, 1, 2));
        let mut dp = DataParallel::new(Box::new(rank));
        dp.bucket_bytes = 4096;
        t.join(dp);
        for _ in 0..2 {
            t.step(&DATA).unwrap();
        }
        trained(&t)
    });
    let one_bucket = ranks(2, config(2, 1, 2));
    assert_eq!(results[0], one_bucket[0].weights, "bucketing changes the grouping, never the values");
}

fn options(dir: &std::path::Path, steps_per_checkpoint: u64) -> RunOptions {
    RunOptions {
        checkpoints: CheckpointPolicy { every: steps_per_checkpoint, ..CheckpointPolicy::default() },
        ..RunOptions::new(dir, 0)
    }
}

/// `session::run` on `world` thread ranks; rank 0's report and every rank's weights.
fn session_ranks(world: usize, cfg: TrainConfig, o: &RunOptions) -> Vec<Result<Weights, String>> {
    on_threads(thread_group(world, Duration::from_secs(60)), |_, rank| {
        let mut t = trainer(cfg.clone());
        t.join(DataParallel::new(Box::new(rank)));
        session::run(&mut t, &DATA, None, o, &mut ()).map(|_| trained(&t)).map_err(|e| e.to_string())
    })
}

#[test]
fn only_the_first_rank_writes_and_a_resume_continues_exactly() {
    let tmp = std::env::temp_dir().join(format!("lisa-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (straight, cut) = (tmp.join("straight"), tmp.join("cut"));
    let full = session_ranks(2, config(2, 1, 4), &options(&straight, 2));
    let w = full[0].clone().unwrap();
    assert_eq!(full[1].clone().unwrap(), w);
    // Rank 0 wrote the checkpoints and 4 metrics rows; nothing else wrote anything.
    assert!(straight.join("checkpoint-2").is_dir() && straight.join("checkpoint-4").is_dir());
    let rows = std::fs::read_to_string(straight.join(session::METRICS_FILE)).unwrap();
    assert_eq!(rows.lines().count(), 4);
    // Stopped after 2 steps, then resumed by both ranks from the latest checkpoint.
    let first = session_ranks(2, config(2, 1, 2), &options(&cut, 2));
    assert!(first.iter().all(Result::is_ok));
    let resumed = RunOptions { resume: Some(ResumeFrom::Latest), ..options(&cut, 2) };
    let second = session_ranks(2, config(2, 1, 4), &resumed);
    assert_eq!(second[0].clone().unwrap(), w, "resumed ranks end where the uninterrupted run did, bit for bit");
    assert_eq!(second[1].clone().unwrap(), w);
    // One rank cannot continue what two began (its global batch would halve).
    let mut alone = trainer(config(2, 1, 6));
    let e = session::run(&mut alone, &DATA, None, &resumed, &mut ()).unwrap_err().to_string();
    assert!(e.contains("written by a run of 2 rank(s), and this run has 1"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn ranks_built_differently_stop_before_the_first_step() {
    let errors = on_threads(thread_group(2, Duration::from_secs(60)), |r, rank| {
        // Rank 1 was given another learning rate.
        let mut cfg = config(2, 1, 2);
        cfg.optim.lr *= 1.0 + r as f32;
        let mut t = trainer(cfg);
        t.join(DataParallel::new(Box::new(rank)));
        t.check_ranks_agree().unwrap_err().to_string()
    });
    for e in errors {
        assert!(e.contains("the ranks disagree on the run's settings"), "{e}");
    }
}

#[test]
fn a_failing_rank_ends_the_others_with_its_reason() {
    let o = options(&std::env::temp_dir().join(format!("lisa-dp-fail-{}", std::process::id())), 0);
    let _ = std::fs::remove_dir_all(&o.output_dir);
    let o = &o;
    let started = Instant::now();
    let results = on_threads(thread_group(2, Duration::from_secs(600)), |r, rank| {
        let mut t = trainer(config(2, 1, 3));
        t.join(DataParallel::new(Box::new(rank)));
        // Rank 1's data has another resolution: its second step fails.
        let wrong = FillCircles { resolution: 8, ..DATA };
        let data: &dyn lisa_trainer::data::Dataset = if r == 1 { &wrong } else { &DATA };
        session::run(&mut t, data, None, o, &mut ()).map(|_| ()).map_err(|e| e.to_string())
    });
    assert!(started.elapsed() < Duration::from_secs(60), "the failure ended the run at once, not at the timeout");
    let e0 = results[0].clone().unwrap_err();
    let e1 = results[1].clone().unwrap_err();
    assert!(e1.contains("values, the model wants"), "{e1}");
    assert!(e0.contains("rank 1 failed") && e0.contains("the model wants"), "rank 0 names rank 1's reason: {e0}");
}

#[test]
fn a_rank_that_stops_answering_ends_the_others_after_the_timeout() {
    let results = on_threads(thread_group(2, Duration::from_millis(500)), |r, rank| {
        let mut t = trainer(config(2, 1, 2));
        t.join(DataParallel::new(Box::new(rank)));
        if r == 1 {
            // Stuck (in I/O, a deadlock, a debugger) but alive: it holds its handle.
            std::thread::sleep(Duration::from_secs(3));
            return None;
        }
        Some(t.step(&DATA).unwrap_err().to_string())
    });
    let e = results[0].clone().unwrap();
    assert!(e.contains("waited 0 s for rank(s) 1"), "{e}");
}

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

#[test]
fn launchers_variables_are_read_and_checked() {
    let torchrun =
        [("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29400")];
    let l = Launch::from_vars(vars(&torchrun)).unwrap().unwrap();
    assert_eq!((l.rank, l.world_size, l.local_rank, l.launcher), (3, 8, 3, Launcher::Torchrun));
    assert_eq!(l.master, ("node0".to_string(), 29400));
    let slurm =
        [("SLURM_PROCID", "5"), ("SLURM_STEP_NUM_TASKS", "16"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "gpu-a")];
    let l = Launch::from_vars(vars(&slurm)).unwrap().unwrap();
    assert_eq!((l.rank, l.world_size, l.local_rank, l.master.1, l.launcher), (5, 16, 1, 29500, Launcher::Slurm));
    // Under torchrun's agent (which serves its own store on MASTER_PORT) lisa listens on the
    // next port, or on LISA_MASTER_PORT.
    let agent = [&torchrun[..], &[("TORCHELASTIC_USE_AGENT_STORE", "True")]].concat();
    assert_eq!(Launch::from_vars(vars(&agent)).unwrap().unwrap().master.1, 29401);
    let chosen = [&agent[..], &[("LISA_MASTER_PORT", "31000")]].concat();
    assert_eq!(Launch::from_vars(vars(&chosen)).unwrap().unwrap().master.1, 31000);
    // None: no launcher, a run of one process, or a SLURM batch script (not an srun step).
    assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
    assert_eq!(Launch::from_vars(vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")])).unwrap(), None);
    assert_eq!(Launch::from_vars(vars(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")])).unwrap(), None);
    let error = |pairs: &[(&str, &str)]| Launch::from_vars(vars(pairs)).unwrap_err().to_string();
    let e = error(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]);
    assert!(e.contains("LOCAL_RANK") && e.contains("is not set"), "{e}");
    let e = error(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("RANK: is 2, but WORLD_SIZE is 2"), "{e}");
    let e = error(&[("RANK", "x"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    assert!(e.contains("\"x\" is not a non-negative integer"), "{e}");
    let e = error(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "a")]);
    assert!(e.contains("MASTER_PORT: is not set"), "{e}");
    let e = error(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "a"),
        ("MASTER_PORT", "70000"),
    ]);
    assert!(e.contains("is not a port number"), "{e}");
    let e = error(&[("SLURM_PROCID", "1"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_LOCALID", "0")]);
    assert!(e.contains("MASTER_ADDR") && e.contains("scontrol show hostnames"), "{e}");
}

/// A free port on this machine (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn launch(rank: usize, world: usize, port: u16) -> Launch {
    Launch {
        rank,
        world_size: world,
        local_rank: rank,
        master: ("127.0.0.1".into(), port),
        launcher: Launcher::Torchrun,
    }
}

#[test]
fn processes_meet_over_tcp_and_reduce_in_rank_order() {
    let port = free_port();
    let world = 3;
    let sums = on_threads((0..world).collect(), |_, r| {
        let (link, payload) =
            rendezvous(&launch(r, world, port), &[7; 32], || Ok(b"unique id".to_vec()), Duration::from_secs(30))
                .unwrap();
        let mut rank = TcpRank::new(link);
        let sum = rank.reduce(vec![0.1 * (r + 1) as f32, 1e8, -(r as f32)]).unwrap();
        let again = rank.reduce(vec![r as f32]).unwrap();
        assert_eq!(again, vec![3.0]);
        rank.finish();
        (payload, sum)
    });
    let want = vec![(0.1f32 + 0.2) + 0.3, (1e8f32 + 1e8) + 1e8, -3.0];
    for (payload, sum) in sums {
        assert_eq!(payload, b"unique id");
        assert_eq!(sum, want, "every rank holds rank 0's sum, bit for bit");
    }
}

#[test]
fn a_rank_with_other_settings_is_refused_at_the_rendezvous() {
    let port = free_port();
    let errors = on_threads(vec![0, 1], |_, r| {
        let digest = [r as u8; 32];
        rendezvous(&launch(r, 2, port), &digest, || Ok(Vec::new()), Duration::from_secs(30))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    });
    for e in errors {
        assert!(e.contains("rank 1") && e.contains("other settings, model or data"), "{e}");
    }
}

#[test]
fn a_rank_that_never_comes_is_named_after_the_timeout() {
    let port = free_port();
    let started = Instant::now();
    let e = rendezvous(&launch(0, 3, port), &[0; 32], || Ok(Vec::new()), Duration::from_millis(300))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank(s) 1, 2 did not join within 0 s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And a rank whose rank 0 never comes.
    let e = rendezvous(&launch(1, 2, free_port()), &[0; 32], || Ok(Vec::new()), Duration::from_millis(300))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 0 did not answer"), "{e}");
}

#[test]
fn a_process_that_dies_ends_the_tcp_reduce_with_its_name() {
    let port = free_port();
    let results = on_threads(vec![0, 1], |_, r| {
        let (link, _) = rendezvous(&launch(r, 2, port), &[1; 32], || Ok(Vec::new()), Duration::from_secs(30)).unwrap();
        let mut rank = TcpRank::new(link);
        if r == 1 {
            drop(rank); // the process died: its socket closes without a goodbye
            return None;
        }
        Some(rank.reduce(vec![1.0]).unwrap_err())
    });
    let e = results[0].clone().unwrap();
    assert!(e.contains("rank 1 closed its connection"), "{e}");
}

#[test]
fn a_gradient_missing_on_one_rank_is_reduced_as_zeros() {
    // Slot 0 has a gradient on rank 1 only (a path that one rank's batch did not take): both
    // ranks reduce the same buckets and get the average, (0 + 2)/2.
    let got: Vec<Vec<f32>> = on_threads(thread_group(2, Duration::from_secs(60)), |r, rank| {
        let mut dp = DataParallel::<C>::new(Box::new(rank));
        let shape = lisa_core::backend::Shape::new([3]);
        let like = C::zeros(&shape, DType::F32, &CpuDevice).unwrap();
        let two = C::full(&shape, 2.0, DType::F32, &CpuDevice).unwrap();
        let mut grads = vec![(r == 1).then(|| two.clone()), Some(two.clone())];
        dp.average_gradients(&mut grads, &[&like, &like]).unwrap();
        dp.finish();
        grads.iter().flat_map(|g| C::to_vec(g.as_ref().unwrap()).unwrap()).collect()
    });
    assert_eq!(got[0], vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0]);
    assert_eq!(got[1], got[0]);
}

/// A group of one that records when each reduction starts (the length it reduces).
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl lisa_core::backend::Collective<C> for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, x: &mut lisa_cpu::CpuTensor) -> lisa_core::Result<()> {
        self.0.lock().unwrap().push(C::to_vec(x)?.len());
        Ok(())
    }
    fn transport(&self) -> &'static str {
        "recorder"
    }
}

#[test]
fn a_bucket_starts_as_soon_as_its_gradients_and_every_earlier_bucket_are_ready() {
    use lisa_trainer::distributed::Overlap;
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut dp = DataParallel::<C>::new(Box::new(Recorder(log.clone())));
    dp.bucket_bytes = 16; // 4 values
    // Slots of 2, 3, 1 and 4 values: buckets (reverse order, ≤ 4 values) [3], [2, 1], [0].
    let shapes = [2usize, 3, 1, 4];
    let like: Vec<lisa_cpu::CpuTensor> = shapes
        .iter()
        .map(|&n| C::zeros(&lisa_core::backend::Shape::new([n]), DType::F32, &CpuDevice).unwrap())
        .collect();
    let refs: Vec<&lisa_cpu::CpuTensor> = like.iter().collect();
    let value = |n: usize, v: f32| C::full(&lisa_core::backend::Shape::new([n]), v, DType::F32, &CpuDevice).unwrap();
    let mut overlap = Overlap::new(&mut dp, &refs).unwrap();
    overlap.ready(1, value(3, 1.0)).unwrap();
    assert!(log.lock().unwrap().is_empty(), "bucket [2, 1] is complete but bucket [3] is not");
    overlap.ready(3, value(4, 3.0)).unwrap();
    assert_eq!(*log.lock().unwrap(), vec![4], "bucket [3] starts; [2, 1] still lacks slot 2");
    overlap.ready(2, value(1, 2.0)).unwrap();
    assert_eq!(*log.lock().unwrap(), vec![4, 4]);
    // Slot 0 never got a gradient on this rank: its bucket starts at the end, as zeros.
    let mut grads = vec![None; 4];
    overlap.finish(&mut grads).unwrap();
    assert_eq!(*log.lock().unwrap(), vec![4, 4, 2]);
    let got: Vec<Vec<f32>> = grads.iter().map(|g| C::to_vec(g.as_ref().unwrap()).unwrap()).collect();
    assert_eq!(got, vec![vec![0.0; 2], vec![1.0; 3], vec![2.0], vec![3.0; 4]]);
}

#[test]
fn ranks_with_gradient_checkpointing_train_as_one_rank_with_the_global_batch() {
    let checkpointed = |batch| TrainConfig { gradient_checkpointing: true, ..config(batch, 2, 2) };
    let mut alone = trainer(checkpointed(4));
    let alone_stats: Vec<StepStats> = (0..2).map(|_| alone.step(&DATA).unwrap()).collect();
    for e in &ranks(2, checkpointed(2)) {
        assert_matches(&alone_stats, &trained(&alone), &e.stats, &e.weights);
    }
}

/// The overlap is real: a parameter's leaf is recorded at its first use, so the backward's
/// sweep hands most gradients over while op nodes are still waiting to run backward.
#[test]
fn gradients_become_final_while_the_backward_still_runs() {
    use lisa_trainer::autodiff::Tape;
    use lisa_trainer::model::{ForwardOptions, SideMode, forward_train};
    use lisa_trainer::run::{RunStream, noise_batch};
    use lisa_trainer::scheduler::NoiseProcess;
    let t = trainer(config(2, 1, 1));
    let model = t.model.as_ref();
    let noise = NoiseProcess::new(&t.config.noise).unwrap();
    let examples: Vec<_> = (0..2).map(|i| lisa_trainer::data::Dataset::get(&DATA, i).unwrap()).collect();
    let batch = noise_batch::<C>(&mut RunStream::new(1), &noise, model, true, &examples, 0.0).unwrap();
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(batch.x_t.clone()), tape.constant(batch.hint.clone().unwrap()));
    let options = ForwardOptions { lisa: true, lisa_samples: None, side: SideMode::Recorded };
    let out = forward_train(model, &bound, &x, &hint, &batch.cond, options).unwrap();
    let seed = |v: &lisa_trainer::autodiff::Var<C>| C::full(&C::shape(&v.value), 1.0, DType::F32, &CpuDevice).unwrap();
    let roots =
        vec![(&out.pred, seed(&out.pred)), (out.decoded.as_ref().unwrap(), seed(out.decoded.as_ref().unwrap()))];
    let total = tape.live_nodes();
    let mut still_to_run = Vec::new();
    tape.backward_each(&roots, |_, _| {
        still_to_run.push(tape.live_nodes());
        Ok(())
    })
    .unwrap();
    let early = still_to_run.iter().filter(|&&n| n > total / 10).count();
    assert!(
        early * 2 > still_to_run.len(),
        "most gradients are final before the last 10% of the backward: {early} of {}",
        still_to_run.len()
    );
}

#[test]
fn a_stray_connection_at_the_rendezvous_is_ignored() {
    use std::io::Write;
    let port = free_port();
    let ok: Vec<bool> = std::thread::scope(|s| {
        let root = s.spawn(move || {
            rendezvous(&launch(0, 2, port), &[3; 32], || Ok(Vec::new()), Duration::from_secs(30)).is_ok()
        });
        // Something that is not a lisa rank (a health check, a scanner) connects first.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stray = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("rank 0 never listened: {e}"),
            }
        };
        stray.write_all(&[0x47; 48]).unwrap();
        drop(stray);
        let rank1 = rendezvous(&launch(1, 2, port), &[3; 32], || Ok(Vec::new()), Duration::from_secs(30)).is_ok();
        vec![root.join().unwrap(), rank1]
    });
    assert_eq!(ok, vec![true, true]);
}
