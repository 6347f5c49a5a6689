//! Nothing lost, nothing deleted, no panic: the `lisa` command against the faults a careful
//! user meets. Runs own their checkpoints and folders; settings are checked before the first
//! step; bad inputs are sentences naming the file or flag; a process killed with SIGKILL at
//! any moment resumes to exactly the uninterrupted state (`LISA_KILL_TRIALS=N` for more
//! trials than CI's 3).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;

use common::{TINY, fails_with, lisa, ok, s, tiny_prior};

/// A fresh folder with the tiny run file and a 2-step prior.
fn setup(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = std::env::temp_dir().join(format!("lisa-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let main = tiny_prior(&d, 2, 2);
    (d, cfg, main)
}

fn train(cfg: &Path, main: &Path, out: &Path, extra: &[&str]) -> Output {
    let base = [
        "train",
        "--config",
        s(cfg),
        "--main",
        s(main),
        "--train-batch-size",
        "2",
        "--validation-steps",
        "0",
        "--output-dir",
        s(out),
    ];
    lisa(&[&base[..], extra].concat())
}

#[test]
fn runs_own_their_checkpoints_and_folders() {
    let (d, cfg, main) = setup("own");
    let run = d.join("run");
    let limit = ["--checkpointing-steps", "1", "--checkpoints-total-limit", "2"];
    ok(&train(&cfg, &main, &run, &[&["--max-train-steps", "4"][..], &limit].concat()));
    assert!(run.join("checkpoint-3").is_dir() && run.join("checkpoint-4").is_dir());
    // A new run into the same folder is refused, and nothing is touched...
    fails_with(&train(&cfg, &main, &run, &["--max-train-steps", "2"]), "holds another run's outputs");
    assert!(run.join("checkpoint-4").is_dir() && run.join("metrics.jsonl").is_file());
    // ...and --overwrite (the user's word) replaces the other run's outputs.
    ok(&train(&cfg, &main, &run, &[&["--max-train-steps", "2", "--overwrite"][..], &limit].concat()));
    assert!(!run.join("checkpoint-4").exists(), "the other run's checkpoints went with --overwrite");
    assert!(run.join("checkpoint-1").is_dir() && run.join("checkpoint-2").is_dir());
    // Pruning touches only the run's own checkpoints: another run's survive a resume.
    let other = run.join("checkpoint-9");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("state.json"), r#"{"run_id": "someone-else"}"#).unwrap();
    fails_with(
        &train(
            &cfg,
            &main,
            &run,
            &["--max-train-steps", "3", "--resume-from-checkpoint", s(&run.join("checkpoint-2"))],
        ),
        "another run's outputs",
    );
    std::fs::remove_dir_all(&other).unwrap();
    // A folder in use by a live process is refused (an operating-system lock, released when
    // its holder ends, so a killed run never blocks the next).
    let lock =
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(run.join(".lisa.lock")).unwrap();
    lock.try_lock().unwrap();
    fails_with(&train(&cfg, &main, &run, &["--resume-from-checkpoint", "latest"]), "in use by another lisa run");
    drop(lock);
    ok(&train(&cfg, &main, &run, &["--max-train-steps", "5", "--resume-from-checkpoint", "latest"]));
    // An existing prior is not overwritten by pretraining.
    fails_with(
        &lisa(&["pretrain", "--config", s(&cfg), "--output", s(&main), "--output-dir", s(&d.join("pre2"))]),
        "--overwrite",
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn settings_are_checked_before_the_first_step() {
    let (d, cfg, main) = setup("early");
    let zero_steps = d.join("zero-steps.toml");
    std::fs::write(&zero_steps, TINY.replace("steps = 2", "steps = 0")).unwrap();
    let euler = d.join("euler.toml");
    std::fs::write(&euler, TINY.replace("steps = 2", "steps = 2\nsampler = { kind = \"euler\" }")).unwrap();
    let nan = d.join("nan.toml");
    std::fs::write(&nan, TINY.replace("steps = 2", "steps = 2\nguidance_scale = nan")).unwrap();
    let no_samples = d.join("no-samples.toml");
    std::fs::write(&no_samples, TINY.replace("samples = 2", "samples = 0")).unwrap();
    for (file, needle) in [
        (&zero_steps, "steps >= 1"),
        (&euler, "the euler sampler needs a rectified flow"),
        (&nan, "must be finite"),
        (&no_samples, "validation.samples: must lie in 1..=4096"),
    ] {
        let run = d.join(format!("run-{}", file.file_stem().unwrap().to_string_lossy()));
        fails_with(&train(file, &main, &run, &["--max-train-steps", "50"]), needle);
        assert!(!run.join("metrics.jsonl").exists(), "{needle}: nothing trained");
    }
    // An output folder that is a file.
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    fails_with(&train(&cfg, &main, &file, &["--max-train-steps", "1"]), "output folder");
    // Absurd sizes are errors, not aborts.
    fails_with(&train(&cfg, &main, &d.join("r1"), &["--train-batch-size", "18446744073709551615"]), "batch");
    let huge = d.join("huge.toml");
    std::fs::write(&huge, TINY.replace("resolution = 16", "resolution = 100000")).unwrap();
    fails_with(&lisa(&["pretrain", "--config", s(&huge), "--output-dir", s(&d.join("p"))]), "resolution");
    let long = d.join("long.toml");
    std::fs::write(&long, TINY.replace("len = 64", "len = 18446744073709551615")).unwrap();
    fails_with(&lisa(&["pretrain", "--config", s(&long), "--output-dir", s(&d.join("p"))]), "len");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bad_files_are_named_and_never_abort() {
    let (d, cfg, main) = setup("files");
    // A 74-byte PNG whose header claims 100000 × 100000 pixels.
    let mut png = b"\\x89PNG\\r\\n\\x1a\\n".to_vec();
    png.clear();
    png.extend_from_slice(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]);
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    png.extend_from_slice(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82]);
    let bomb = d.join("bomb.png");
    std::fs::write(&bomb, &png).unwrap();
    fails_with(
        &lisa(&["sample", "--main", s(&main), "--condition", s(&bomb), "--prompt", "red circle with blue background"]),
        "larger than lisa reads",
    );
    // Negative numbers are values, checked as such.
    let good = d.join("good.png");
    image::GrayImage::new(16, 16).save(&good).unwrap();
    fails_with(
        &lisa(&[
            "sample",
            "--main",
            s(&main),
            "--condition",
            s(&good),
            "--prompt",
            "red circle with blue background",
            "--eta",
            "-1",
        ]),
        "eta must lie in [0, 1]",
    );
    // `lisa sample` writes images at a viewable size.
    let out = d.join("sample.png");
    ok(&lisa(&[
        "sample",
        "--main",
        s(&main),
        "--condition",
        s(&good),
        "--prompt",
        "Red Circle with BLUE background",
        "--steps",
        "2",
        "--output",
        s(&out),
    ]));
    assert!(image::open(&out).unwrap().width() >= 96);
    // A closed standard output is not an error (`lisa eval | head`).
    let mut child = Command::new(env!("CARGO_BIN_EXE_lisa"))
        .args(["eval", "--main", s(&main), "--steps", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    let _ = cfg;
    std::fs::remove_dir_all(d).unwrap();
}

/// The CRC-32 of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn the_decoder_lr_and_tau_normalisation_flags_reach_the_run() {
    let (d, cfg, main) = setup("options");
    let run = d.join("run");
    let out = train(&cfg, &main, &run, &["--max-train-steps", "1", "--normalize-tau", "--decoder-lr-scale", "3"]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.contains("τ's scale per timestep bucket")).expect("the τ scales are printed");
    let scales: Vec<f32> = line.rsplit(": ").next().unwrap().split(' ').map(|v| v.parse().unwrap()).collect();
    assert!(scales.len() == 20 && scales.iter().all(|v| *v > 0.0), "{line}");
    let state = std::fs::read_to_string(run.join("checkpoint-1/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["config"]["decoder_lr_scale"], 3.0, "{state}");
    assert_eq!(state["config"]["normalize_tau"]["buckets"], 20, "{state}");
}

#[test]
fn diverging_runs_stop_with_the_step_and_keep_the_last_good_checkpoint() {
    let (d, cfg, main) = setup("nan");
    let run = d.join("run");
    ok(&train(&cfg, &main, &run, &["--max-train-steps", "2", "--checkpointing-steps", "1"]));
    fails_with(
        &train(
            &cfg,
            &main,
            &run,
            &["--max-train-steps", "6", "--resume-from-checkpoint", "latest", "--learning-rate", "1e30"],
        ),
        "diverged at step",
    );
    assert!(
        !run.join("checkpoint-3").exists() || lisa_trainer::checkpoint::read_configs(&run.join("checkpoint-3")).is_ok()
    );
    // The last checkpoint is good: it resumes with a lower learning rate.
    ok(&train(
        &cfg,
        &main,
        &run,
        &["--max-train-steps", "3", "--resume-from-checkpoint", "latest", "--learning-rate", "1e-4"],
    ));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn sigkill_at_any_moment_resumes_to_the_uninterrupted_state() {
    let trials: usize = std::env::var("LISA_KILL_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (d, cfg, main) = setup("kill");
    let steps = 24;
    let args = |run: &Path, extra: &[&str]| -> Vec<String> {
        let base = ["train", "--config", s(&cfg), "--main", s(&main), "--train-batch-size", "2"];
        let more = ["--validation-steps", "0", "--checkpointing-steps", "1", "--output-dir", s(run)];
        base.iter().chain(&more).chain(extra).map(|a| a.to_string()).collect()
    };
    let n = steps.to_string();
    let straight = d.join("straight");
    let start = std::time::Instant::now();
    ok(&Command::new(env!("CARGO_BIN_EXE_lisa")).args(args(&straight, &["--max-train-steps", &n])).output().unwrap());
    let span = start.elapsed();
    let mut killed_mid_run = 0;
    for trial in 0..trials {
        let run = d.join(format!("killed-{trial}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_lisa"))
            .args(args(&run, &["--max-train-steps", &n]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill at moments spread over the run: before, during and between the saves.
        std::thread::sleep(span.mul_f64((trial as f64 + 0.5) / trials as f64));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        let done = lisa_trainer::checkpoint::list_checkpoints(&run).last().map_or(0, |c| c.0);
        if !finished && done < steps as u64 {
            killed_mid_run += 1;
        }
        let resume = if done == 0 { "--overwrite" } else { "--resume-from-checkpoint=latest" };
        ok(&Command::new(env!("CARGO_BIN_EXE_lisa"))
            .args(args(&run, &["--max-train-steps", &n, resume]))
            .output()
            .unwrap());
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let a = std::fs::read(straight.join(format!("checkpoint-{steps}")).join(f)).unwrap();
            let b = std::fs::read(run.join(format!("checkpoint-{steps}")).join(f)).unwrap();
            assert!(a == b, "trial {trial} (killed after checkpoint {done}): {f} differs from the uninterrupted run");
        }
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let logged: Vec<u64> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
            .collect();
        assert_eq!(logged, (1..=steps as u64).collect::<Vec<_>>(), "trial {trial}: one metrics line per step");
    }
    assert!(killed_mid_run > 0, "no trial was killed during its run: the kill moments missed it");
    std::fs::remove_dir_all(d).unwrap();
}

/// The checkpoint steps in `dir`.
fn checkpoints(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

/// The `step` of every row of a metrics file.
fn metric_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

/// Resuming an older checkpoint abandons the run's later ones: they are moved aside (or
/// deleted, when asked), so that pruning keeps the new branch and `latest` resumes it.
#[test]
fn rolling_back_retires_the_abandoned_branch() {
    let (d, cfg, main) = setup("rollback");
    let run = d.join("run");
    let limit = ["--checkpointing-steps", "2", "--checkpoints-total-limit", "2"];
    ok(&train(&cfg, &main, &run, &[&["--max-train-steps", "6"][..], &limit].concat()));
    assert_eq!(checkpoints(&run), [4, 6]);
    let ckpt4 = run.join("checkpoint-4");
    let back = [s(&ckpt4), "--max-train-steps", "8"];
    let err = ok(&train(&cfg, &main, &run, &[&["--resume-from-checkpoint"][..], &back, &limit].concat()));
    assert!(err.contains("later checkpoints (checkpoint-6) moved to"), "{err}");
    assert_eq!(checkpoints(&run), [6, 8], "the new branch's checkpoints, pruned among themselves");
    let aside: Vec<PathBuf> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("abandoned-"))
        .collect();
    assert_eq!(aside.len(), 1, "one folder for the abandoned branch");
    assert_eq!(checkpoints(&aside[0]), [6], "nothing deleted by default");
    assert_eq!(metric_steps(&run), (1..=8).collect::<Vec<_>>(), "each step once, no gap");
    // `latest` resumes the new branch; with --rollback delete the abandoned one is removed.
    let more = ["--resume-from-checkpoint", "latest", "--max-train-steps", "9"];
    ok(&train(&cfg, &main, &run, &[&more[..], &limit].concat()));
    assert_eq!(metric_steps(&run), (1..=9).collect::<Vec<_>>());
    let ckpt8 = run.join("checkpoint-8");
    let again = [s(&ckpt8), "--max-train-steps", "8", "--rollback", "delete"];
    let err = ok(&train(&cfg, &main, &run, &[&["--resume-from-checkpoint"][..], &again, &limit].concat()));
    assert!(err.contains("(checkpoint-9) deleted"), "{err}");
    assert_eq!(checkpoints(&run), [8]);
}

/// A validation that cannot write its grid stops the run only after the step's metrics row
/// and a checkpoint are written: no step is lost, and the run resumes from there.
#[test]
fn a_failed_last_validation_loses_no_training() {
    let (d, cfg, main) = setup("lastgrid");
    let run = d.join("run");
    // The last validation's grid cannot be written: a folder holds its name.
    std::fs::create_dir_all(run.join("validation-000003.png")).unwrap();
    let steps = ["--max-train-steps", "3", "--checkpointing-steps", "100"];
    fails_with(&train(&cfg, &main, &run, &steps), "validation-000003.png");
    assert_eq!(checkpoints(&run), [3], "the final checkpoint is written before the error");
    assert_eq!(metric_steps(&run), [1, 2, 3]);
    ok(&train(&cfg, &main, &run, &[&steps[..], &["--resume-from-checkpoint", "latest"]].concat()));
}

/// `--overwrite` removes only what lisa's checkpoint format wrote: a user's folder that
/// happens to be called `checkpoint-N` is refused, and left as it was.
#[test]
fn overwrite_never_deletes_a_folder_lisa_did_not_write() {
    let (d, cfg, main) = setup("alien");
    let run = d.join("run");
    std::fs::create_dir_all(run.join("checkpoint-7")).unwrap();
    std::fs::write(run.join("checkpoint-7/notes.txt"), "mine").unwrap();
    for extra in [&["--overwrite"][..], &[]] {
        let args = [&["--max-train-steps", "1"][..], extra].concat();
        fails_with(&train(&cfg, &main, &run, &args), "is not a lisa checkpoint");
    }
    assert_eq!(std::fs::read_to_string(run.join("checkpoint-7/notes.txt")).unwrap(), "mine");
}

/// `latest` is the checkpoint whose `state.json` records the highest step, whatever its
/// folder is called: a folder renamed by hand does not steer a resume.
#[test]
fn latest_reads_the_step_from_the_state_not_the_folder_name() {
    let (d, cfg, main) = setup("latest-state");
    let run = d.join("run");
    ok(&train(&cfg, &main, &run, &["--max-train-steps", "2", "--checkpointing-steps", "1"]));
    std::fs::rename(run.join("checkpoint-1"), run.join("checkpoint-9")).unwrap();
    let err = ok(&train(&cfg, &main, &run, &["--max-train-steps", "3", "--resume-from-checkpoint", "latest"]));
    assert!(err.contains("checkpoint-2"), "resumed from step 2, not the folder named 9:\n{err}");
    assert_eq!(metric_steps(&run), [1, 2, 3]);
}

/// A run stopped before its first step leaves a metrics file without a step: nothing worth
/// keeping, so the next start needs no --overwrite. A file with steps is still refused.
#[test]
fn a_run_stopped_before_its_first_step_can_start_again() {
    let (d, cfg, main) = setup("restart-empty");
    let run = d.join("run");
    std::fs::create_dir_all(&run).unwrap();
    for leftover in ["", "\n", "{\"run\": \"r-old\"}\n"] {
        std::fs::write(run.join("metrics.jsonl"), leftover).unwrap();
        ok(&train(&cfg, &main, &run, &["--max-train-steps", "1"]));
        assert_eq!(metric_steps(&run), [1]);
        std::fs::remove_dir_all(run.join("checkpoint-1")).unwrap();
        std::fs::remove_dir_all(run.join("controlnet")).ok();
    }
    // A metrics file with a step (of a run whose checkpoints were removed) is kept.
    fails_with(&train(&cfg, &main, &run, &["--max-train-steps", "1"]), "holds another run's outputs");
    // A file that is not lisa's rows is kept too.
    std::fs::write(run.join("metrics.jsonl"), "my notes\n").unwrap();
    fails_with(&train(&cfg, &main, &run, &["--max-train-steps", "1"]), "holds another run's outputs");
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(), "my notes\n");
}

/// A checkpoint is resumed by content: the same output folder moved, and named by a relative
/// path from another working directory, resumes to the uninterrupted state.
#[test]
fn a_moved_output_folder_resumes_by_content() {
    let (d, cfg, main) = setup("moved");
    let (straight, run) = (d.join("straight"), d.join("run"));
    ok(&train(&cfg, &main, &straight, &["--max-train-steps", "2"]));
    ok(&train(&cfg, &main, &run, &["--max-train-steps", "1"]));
    std::fs::rename(&run, d.join("moved")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lisa"))
        .current_dir(&d)
        .args(["train", "--config", s(&cfg), "--main", s(&main), "--train-batch-size", "2"])
        .args(["--validation-steps", "0", "--output-dir", "./moved", "--max-train-steps", "2"])
        .args(["--resume-from-checkpoint", "latest"])
        .output()
        .unwrap();
    ok(&out);
    let weights = |dir: &Path| std::fs::read(dir.join("checkpoint-2/model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&d.join("moved")), "the moved run's step 2 is the uninterrupted one");
}
