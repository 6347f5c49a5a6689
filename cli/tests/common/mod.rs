//! What the command's tests share: the tiny run file, running `lisa`, checking its outcome.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tiny model (16 × 16, channels 8/16) with a short validation.
pub const TINY: &str = r#"
[model.unet]
resolution = 16
channels = [8, 16]
norm_groups = 4
time_sinusoidal_dim = 16
time_dim = 16

[model.control]
hint_hidden = 8

[model.decoder]
hook = "down_1"
time_sinusoidal_dim = 16
channel_floor = 4

[data]
len = 64

[validation]
samples = 2

[validation.sampling]
steps = 2
"#;

/// Pretrains the prior of the tiny run file `dir/tiny.toml` for `steps` steps at batch
/// `batch` (checkpoints in `dir/pre`) and returns its path, `dir/main.safetensors`.
pub fn tiny_prior(dir: &Path, steps: u32, batch: u32) -> PathBuf {
    let main = dir.join("main.safetensors");
    ok(&lisa(&[
        "pretrain",
        "--config",
        s(&dir.join("tiny.toml")),
        "--output",
        s(&main),
        "--output-dir",
        s(&dir.join("pre")),
        "--max-train-steps",
        &steps.to_string(),
        "--train-batch-size",
        &batch.to_string(),
    ]));
    main
}

/// Runs the `lisa` binary.
pub fn lisa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lisa")).args(args).output().expect("run lisa")
}

/// Succeeded; returns stderr.
pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lisa failed:\n{err}");
    err
}

/// Fails with a message containing `needle`: non-zero exit, no panic, no Rust debug dump.
pub fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure mentioning {needle:?}, got success:\n{err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}:\n{err}");
    assert!(!err.contains("panicked") && !err.contains(" { "), "no panic, no debug dump:\n{err}");
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `lisa args` started as rank `rank` of `world` by `launcher` (`"torchrun"` or `"srun"`):
/// the variables that launcher sets, rank 0 listening at 127.0.0.1:`port`; output captured.
pub fn launched_as(launcher: &str, args: &[String], rank: usize, world: usize, port: u16) -> std::process::Child {
    let vars = match launcher {
        "torchrun" => [("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)],
        "srun" => [("SLURM_PROCID", rank), ("SLURM_LOCALID", rank), ("SLURM_STEP_NUM_TASKS", world)],
        other => panic!("an unknown launcher {other}"),
    };
    let mut c = Command::new(env!("CARGO_BIN_EXE_lisa"));
    c.args(args).env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
    for (k, v) in vars {
        c.env(k, v.to_string());
    }
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("run lisa")
}

/// A port free on this machine (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits for each of `children`; their outputs in order.
pub fn wait_all(children: Vec<std::process::Child>) -> Vec<Output> {
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// The words after `--bin lisa --` of the first `lisa -- train` line in the first command
/// block after the README heading `heading` (continuation lines joined, double quotes kept
/// together), for a test to run the command as written.
pub fn readme_train_command(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("the README has no {heading:?}"));
    let block = section.split("```text").nth(1).and_then(|b| b.split("```").next()).expect("its command block");
    let block = block.replace("\\\n", " ");
    let line = block.lines().find(|l| l.contains("lisa -- train")).expect("the lisa train line");
    let args = line.split("--bin lisa --").nth(1).unwrap();
    let (mut words, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in args.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}
