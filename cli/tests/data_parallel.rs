//! `lisa train` on several ranks, without a GPU: `--gpus 2` on the CPU backend (two ranks in
//! one process, sharing the CPU) and two processes started as torchrun starts them (their
//! variables, the TCP rendezvous and collective), each against one rank with the global batch;
//! ranks that disagree or never come.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{TINY, fails_with, free_port, launched_as, lisa, ok, s, tiny_prior, wait_all};
use lisa_core::tolerance::DATA_PARALLEL_LOSS_F32;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    d
}

/// The arguments of a 3-step training run of the tiny model into `out`.
fn train_args(d: &Path, main: &Path, out: &Path, batch: usize) -> Vec<String> {
    [
        "train",
        "--config",
        s(&d.join("tiny.toml")),
        "--main",
        s(main),
        "--max-train-steps",
        "3",
        "--validation-steps",
        "0",
        "--proportion-empty-prompts",
        "0.25",
        "--train-batch-size",
        &batch.to_string(),
        "--output-dir",
        s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// `loss` of every row of a run's metrics.jsonl.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

fn assert_same_training(alone: &Path, ranks: &Path) {
    let (a, b) = (losses(alone), losses(ranks));
    assert_eq!(a.len(), 3);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(DATA_PARALLEL_LOSS_F32.accepts(*y, *x), "losses {b:?} on ranks vs {a:?} alone");
    }
}

#[test]
fn gpus_2_on_the_cpu_trains_as_one_rank_with_the_global_batch() {
    let d = workdir("threads");
    let main = tiny_prior(&d, 1, 2);
    let alone = d.join("alone");
    ok(&lisa(&train_args(&d, &main, &alone, 4).iter().map(String::as_str).collect::<Vec<_>>()));
    let ranks = d.join("ranks");
    let mut args = train_args(&d, &main, &ranks, 2);
    args.extend(["--gpus".to_string(), "2".to_string()]);
    let err = ok(&lisa(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(err.contains("2 ranks share it"), "{err}");
    assert_same_training(&alone, &ranks);
    assert!(ranks.join("checkpoint-3").is_dir());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn two_processes_launched_like_torchrun_train_as_one_rank_with_the_global_batch() {
    let d = workdir("procs");
    let main = tiny_prior(&d, 1, 2);
    let alone = d.join("alone");
    ok(&lisa(&train_args(&d, &main, &alone, 4).iter().map(String::as_str).collect::<Vec<_>>()));
    let ranks = d.join("ranks");
    let args = train_args(&d, &main, &ranks, 2);
    let port = free_port();
    let outs = wait_all(vec![launched_as("torchrun", &args, 0, 2, port), launched_as("torchrun", &args, 1, 2, port)]);
    ok(&outs[0]);
    ok(&outs[1]);
    assert_same_training(&alone, &ranks);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn launched_ranks_that_disagree_or_never_come_are_clear_errors() {
    let d = workdir("refused");
    let main = tiny_prior(&d, 1, 2);
    let args = train_args(&d, &main, &d.join("r"), 2);
    // Rank 1 was given another learning rate: both stop before training.
    let mut other = args.clone();
    other.extend(["--learning-rate".to_string(), "3e-4".to_string()]);
    let port = free_port();
    let outs = wait_all(vec![launched_as("torchrun", &args, 0, 2, port), launched_as("torchrun", &other, 1, 2, port)]);
    fails_with(&outs[0], "other settings, model or data than rank 0");
    fails_with(&outs[1], "rank 0 refused the run");
    // Rank 1 never starts: rank 0 names it after the timeout.
    let mut waiting = args.clone();
    waiting.extend(["--collective-timeout".to_string(), "2".to_string()]);
    fails_with(
        &wait_all(vec![launched_as("torchrun", &waiting, 0, 2, free_port())])[0],
        "rank(s) 1 did not join within 2 s",
    );
    // --gpus in a launched run, and launcher variables that do not add up.
    let mut gpus = args.clone();
    gpus.extend(["--gpus".to_string(), "2".to_string()]);
    fails_with(
        &wait_all(vec![launched_as("torchrun", &gpus, 0, 2, free_port())])[0],
        "one process per GPU; drop --gpus",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_lisa"))
        .args(&args)
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env_remove("MASTER_PORT")
        .output()
        .unwrap();
    fails_with(&out, "MASTER_PORT: is not set");
    let mut zero = args.clone();
    zero.extend(["--gpus".to_string(), "0".to_string()]);
    fails_with(&lisa(&zero.iter().map(String::as_str).collect::<Vec<_>>()), "--gpus must be at least 1");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_launched_rank_killed_mid_run_ends_the_others_with_its_name() {
    let d = workdir("killed");
    let main = tiny_prior(&d, 1, 2);
    let out = d.join("r");
    let mut args = train_args(&d, &main, &out, 2);
    // Long enough to be killed in; a timeout so that a failure of this test cannot hang CI.
    let at = args.iter().position(|a| a == "--max-train-steps").unwrap();
    args[at + 1] = "100000".into();
    args.extend(["--collective-timeout".to_string(), "60".to_string()]);
    let port = free_port();
    let rank0 = launched_as("torchrun", &args, 0, 2, port);
    let mut rank1 = launched_as("torchrun", &args, 1, 2, port);
    let started = std::time::Instant::now();
    while !out.join("metrics.jsonl").is_file() || std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().is_empty()
    {
        assert!(started.elapsed().as_secs() < 60, "the run never took a step");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    rank1.kill().unwrap(); // SIGKILL: no goodbye, no error message from it
    rank1.wait().unwrap();
    let out0 = rank0.wait_with_output().unwrap();
    fails_with(&out0, "rank 1 closed its connection");
    assert!(started.elapsed().as_secs() < 50, "rank 0 stopped at once, not at the timeout");
    std::fs::remove_dir_all(d).unwrap();
}
