//! Every `lisa …` line of the README's command block runs as written, on a tiny model: the
//! run file and the shipped prior are swapped for tiny ones and the step counts shortened
//! (6000 → 2, 600 → 2, 900 → 4), and the study file for a two-step one, nothing else.

use std::path::Path;
use std::process::Command;

mod common;

use common::TINY;

/// The tiny model with small batches for pretraining and training.
fn tiny_run_file() -> String {
    format!("{TINY}\n[pretrain]\nbatch_size = 2\n\n[train]\nbatch_size = 2\n")
}

/// The command block of the README's "The `lisa` command" section.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("## The `lisa` command").nth(1).expect("the README has a `lisa` command section");
    let block = section.split("```").nth(1).expect("a command block");
    block.lines().filter(|l| l.starts_with("lisa ")).map(str::to_string).collect()
}

/// Splits a command line into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// A two-step study of the tiny model, in place of the shipped study files.
const TINY_STUDY: &str = r#"
base = "tiny.toml"
main = "tiny-prior.safetensors"
seeds = [0, 1]
validation_steps = 2

[[arm]]
name = "baseline"
set.train.mode = "baseline"
set.train.max_train_steps = 2

[[arm]]
name = "lisa"
set.train.mode = "lisa"
set.train.max_train_steps = 2
"#;

fn tiny(line: &str) -> String {
    line.replace("assets/studies/lambda.toml", "tiny-study.toml")
        .replace("assets/demo.toml", "tiny.toml")
        .replace("assets/prior.safetensors", "tiny-prior.safetensors")
        .replace("--max-train-steps 6000", "--max-train-steps 2")
        .replace("--max-train-steps 600 ", "--max-train-steps 2 ")
        .replace("--max-train-steps 900 ", "--max-train-steps 4 ")
        .replace("checkpoint-600", "checkpoint-2")
        .replace("checkpoint-900", "checkpoint-4")
        .replace("validation-000900", "validation-000004")
}

#[test]
fn the_readme_commands_run_as_written() {
    let lines = readme_commands();
    assert!(lines.len() >= 5, "the README's command block: {lines:?}");
    let dir = std::env::temp_dir().join(format!("lisa-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tiny.toml"), tiny_run_file()).unwrap();
    std::fs::write(dir.join("tiny-study.toml"), TINY_STUDY).unwrap();
    let run = |args: &[String]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lisa")).args(args).current_dir(&dir).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "`lisa {}` failed:\n{err}", args.join(" "));
        assert!(!err.contains("panicked"));
    };
    // The "shipped prior" and the demo's outputs that the last line evaluates.
    let prior =
        ["pretrain", "--config", "tiny.toml", "--output", "tiny-prior.safetensors", "--output-dir", "runs/tiny"];
    run(&[&prior[..], &["--max-train-steps", "2"]].concat().iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let demo = ["demo", "--config", "tiny.toml", "--main", "tiny-prior.safetensors", "--max-train-steps", "2"];
    run(&demo.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for line in &lines {
        let w = words(&tiny(line));
        run(&w[1..]);
    }
    assert!(dir.join("runs/sample.png").is_file() && dir.join("runs/lisa/eval.png").is_file());
    assert!(dir.join("runs/study-lambda/summary.json").is_file());
    std::fs::remove_dir_all(dir).unwrap();
}
