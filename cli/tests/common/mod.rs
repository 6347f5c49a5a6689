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
    readme_command(heading, "train")
}

/// The words after `lisa --` of the `lisa SUBCOMMAND` line in the first command block after
/// `marker` in the README (continuation lines joined; quotes kept together, removed).
pub fn readme_command(marker: &str, subcommand: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split(marker).nth(1).unwrap_or_else(|| panic!("the README has no {marker:?}"));
    let block = section.split("```text").nth(1).and_then(|b| b.split("```").next()).expect("its command block");
    let block = block.replace("\\\n", " ");
    let pattern = format!("lisa -- {subcommand}");
    let line = block.lines().find(|l| l.contains(&pattern)).unwrap_or_else(|| panic!("no {pattern:?} line"));
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

/// One event of a TensorBoard event file, as the test reads it back.
#[derive(Debug, Default)]
pub struct TbEvent {
    /// `Event.step`.
    pub step: i64,
    /// `Event.file_version`.
    pub file_version: Option<String>,
    /// A `SessionLog` START.
    pub session_start: bool,
    /// `(tag, simple_value)` of the summary.
    pub scalars: Vec<(String, f32)>,
    /// `(tag, width, height, PNG bytes)` of the summary's images.
    pub images: Vec<(String, i64, i64, Vec<u8>)>,
}

/// The protocol-buffer fields of `bytes`: `(number, varint or fixed value, length-delimited
/// bytes)`.
fn proto_fields(bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let varint = |at: &mut usize| {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = bytes[*at];
            *at += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b < 0x80 {
                return v;
            }
        }
    };
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let key = varint(&mut at);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, varint(&mut at), Vec::new())),
            1 => {
                out.push((field, u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()), Vec::new()));
                at += 8;
            }
            5 => {
                out.push((field, u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())), Vec::new()));
                at += 4;
            }
            2 => {
                let len = varint(&mut at) as usize;
                out.push((field, 0, bytes[at..at + len].to_vec()));
                at += len;
            }
            other => panic!("wire type {other}"),
        }
    }
    out
}

/// The events of a TensorBoard event file (TFRecords; lengths checked, not checksums).
pub fn read_events(path: &Path) -> Vec<TbEvent> {
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut events) = (0, Vec::new());
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + len];
        at += 16 + len;
        let mut e = TbEvent::default();
        for (field, value, inner) in proto_fields(data) {
            match field {
                2 => e.step = value as i64,
                3 => e.file_version = Some(String::from_utf8(inner).unwrap()),
                5 => {
                    for (_, _, v) in proto_fields(&inner) {
                        let v = proto_fields(&v);
                        let tag = String::from_utf8(v.iter().find(|f| f.0 == 1).unwrap().2.clone()).unwrap();
                        if let Some(s) = v.iter().find(|f| f.0 == 2) {
                            e.scalars.push((tag, f32::from_bits(s.1 as u32)));
                        } else if let Some(img) = v.iter().find(|f| f.0 == 4) {
                            let img = proto_fields(&img.2);
                            let get = |n| img.iter().find(|f| f.0 == n).unwrap();
                            e.images.push((tag, get(2).1 as i64, get(1).1 as i64, get(4).2.clone()));
                        }
                    }
                }
                7 => e.session_start = proto_fields(&inner).iter().any(|f| f.0 == 1 && f.1 == 1),
                _ => {}
            }
        }
        events.push(e);
    }
    events
}

/// The event files in `dir`, oldest first (their names start with the creation time).
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains("tfevents")).collect())
        .unwrap_or_default();
    files.sort();
    files
}
