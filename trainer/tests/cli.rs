//! The `lisa` command end to end on a tiny configuration, and its handling of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = r#"
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
samples = 4

[validation.sampling]
steps = 3
"#;

fn lisa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lisa")).args(args).output().expect("run lisa")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "lisa failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Fails with a message containing `needle`, with a non-zero exit and no panic.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure mentioning {needle:?}, got success:\n{err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}:\n{err}");
    assert!(!err.contains("panicked"), "must not panic:\n{err}");
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pretrain_train_resume_eval_sample_end_to_end() {
    let d = workdir("e2e");
    let cfg = d.join("tiny.toml");
    let main = d.join("main.safetensors");
    ok(&lisa(&[
        "pretrain",
        "--config",
        s(&cfg),
        "--output",
        s(&main),
        "--max-train-steps",
        "3",
        "--train-batch-size",
        "4",
    ]));
    assert!(main.is_file());

    let run = d.join("run");
    let common = ["--config", s(&cfg), "--main", s(&main), "--train-batch-size", "4", "--output-dir", s(&run)];
    let out = lisa(
        &[
            &["train"][..],
            &common,
            &[
                "--max-train-steps",
                "4",
                "--validation-steps",
                "2",
                "--checkpointing-steps",
                "2",
                "--checkpoints-total-limit",
                "1",
            ],
        ]
        .concat(),
    );
    ok(&out);
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("effective batch 4") && summary.contains("parameters trained"), "{summary}");
    assert!(
        run.join("checkpoint-4").is_dir() && !run.join("checkpoint-2").exists(),
        "total limit 1 keeps only the newest"
    );
    assert!(run.join("validation-000002.png").is_file() && run.join("validation-000004.png").is_file());
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 4);

    let out = lisa(
        &[
            &["train"][..],
            &common,
            &["--max-train-steps", "6", "--resume-from-checkpoint", "latest", "--validation-steps", "0"],
        ]
        .concat(),
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resumed from"));
    assert!(run.join("checkpoint-6").is_dir());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 6);

    let out = lisa(&[
        "eval",
        "--config",
        s(&cfg),
        "--main",
        s(&main),
        "--checkpoint",
        s(&run.join("checkpoint-6")),
        "--grid",
        s(&d.join("eval.png")),
    ]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("iou "));
    assert!(d.join("eval.png").is_file());

    let condition = run.join("validation-000002.png");
    let sample_png = d.join("sample.png");
    ok(&lisa(&[
        "sample",
        "--config",
        s(&cfg),
        "--main",
        s(&main),
        "--checkpoint",
        s(&run.join("checkpoint-6")),
        "--condition",
        s(&condition),
        "--prompt",
        "red circle with blue background",
        "--steps",
        "3",
        "--output",
        s(&sample_png),
    ]));
    assert!(sample_png.is_file());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = workdir("bad");
    let cfg = d.join("tiny.toml");
    let main = d.join("main.safetensors");
    ok(&lisa(&[
        "pretrain",
        "--config",
        s(&cfg),
        "--output",
        s(&main),
        "--max-train-steps",
        "1",
        "--train-batch-size",
        "2",
    ]));
    let train = |extra: &[&str]| {
        lisa(
            &[
                &[
                    "train",
                    "--config",
                    s(&cfg),
                    "--main",
                    s(&main),
                    "--max-train-steps",
                    "1",
                    "--train-batch-size",
                    "2",
                    "--output-dir",
                    s(&d.join("r")),
                ][..],
                extra,
            ]
            .concat(),
        )
    };

    fails_with(&train(&["--hook", "up_3"]), "unknown hook layer");
    fails_with(&train(&["--lambda", "-0.5"]), "--lambda must be finite and >= 0");
    fails_with(&train(&["--resume-from-checkpoint", s(&d.join("nowhere"))]), "does not exist");
    fails_with(&train(&["--distance", "l1"]), "mse | cosine");
    fails_with(
        &lisa(&["train", "--config", s(&cfg), "--main", s(&d.join("missing.safetensors"))]),
        "missing.safetensors",
    );

    let wrong_type = d.join("wrong.toml");
    std::fs::write(&wrong_type, "[model.unet]\nresolution = \"big\"\n").unwrap();
    fails_with(&lisa(&["pretrain", "--config", s(&wrong_type), "--max-train-steps", "1"]), "wrong.toml");
    let unknown_key = d.join("unknown.toml");
    std::fs::write(&unknown_key, "[train]\nlearning_rat = 1\n").unwrap();
    fails_with(&lisa(&["pretrain", "--config", s(&unknown_key), "--max-train-steps", "1"]), "unknown field");

    let corrupt = d.join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    fails_with(
        &lisa(&[
            "sample",
            "--config",
            s(&cfg),
            "--main",
            s(&main),
            "--condition",
            s(&corrupt),
            "--prompt",
            "red circle with blue background",
        ]),
        "corrupt.png",
    );
    fails_with(
        &lisa(&[
            "sample",
            "--config",
            s(&cfg),
            "--main",
            s(&main),
            "--condition",
            s(&corrupt),
            "--prompt",
            "mauve circle with blue background",
        ]),
        "unknown colour",
    );
    std::fs::remove_dir_all(d).unwrap();
}
