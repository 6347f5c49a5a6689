//! The `lisa` command end to end on a tiny configuration, and its handling of bad input.

use std::path::{Path, PathBuf};
mod common;

use common::{TINY, fails_with, lisa, ok, s, tiny_prior};

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    d
}

#[test]
fn pretrain_train_resume_eval_sample_end_to_end() {
    let d = workdir("e2e");
    let cfg = d.join("tiny.toml");
    let main = tiny_prior(&d, 3, 4);
    assert!(main.is_file() && d.join("pre/checkpoint-3").is_dir());

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
    // Without a run file, the model comes from the weights (the prior records it).
    ok(&lisa(&["eval", "--main", s(&main), "--steps", "2"]));

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
    let main = tiny_prior(&d, 1, 2);
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
    fails_with(&train(&["--lambda", "-0.5"]), "--lambda: must be finite and >= 0");
    fails_with(&train(&["--resume-from-checkpoint", s(&d.join("nowhere"))]), "does not exist");
    fails_with(&train(&["--distance", "l1"]), "mse | cosine");
    fails_with(&train(&["--decoder-lr-scale", "0"]), "--decoder-lr-scale: must be > 0");
    // Choices are parsed by the flag (the library's FromStr), and the error names the flag.
    fails_with(&train(&["--target-space", "pixels"]), "--target-space");
    fails_with(&train(&["--lr-scheduler", "linear"]), "constant | constant_with_warmup | cosine");
    // The same value from the run file is named by its section and key, once, by the library.
    let bad_lambda = d.join("bad-lambda.toml");
    std::fs::write(&bad_lambda, format!("{}\n[train.lisa]\nlambda = -1.0\n", std::fs::read_to_string(&cfg).unwrap()))
        .unwrap();
    let out = lisa(&["train", "--config", s(&bad_lambda), "--main", s(&main), "--output-dir", s(&d.join("r"))]);
    fails_with(&out, "bad-lambda.toml: [train.lisa] lambda: must be finite and >= 0");
    fails_with(&train(&["--train-data-dir", s(&d.join("no-such-folder"))]), "dataset folder not found");
    // A backend this machine cannot run (or this binary was built without) is an error.
    fails_with(&lisa(&["--backend", "cuda", "pretrain", "--config", s(&cfg), "--max-train-steps", "1"]), "cuda");
    fails_with(
        &lisa(&["train", "--config", s(&cfg), "--main", s(&d.join("missing.safetensors"))]),
        "missing.safetensors",
    );

    let wrong_type = d.join("wrong.toml");
    std::fs::write(&wrong_type, "[model.unet]\nresolution = \"big\"\n").unwrap();
    fails_with(&lisa(&["pretrain", "--config", s(&wrong_type), "--max-train-steps", "1"]), "wrong.toml");
    fails_with(
        &lisa(&["pretrain", "--config", s(&cfg), "--train-batch-size", "0"]),
        "--train-batch-size: must lie in 1..=",
    );
    let no_samples = d.join("no-samples.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("samples = 2", "samples = 0");
    std::fs::write(&no_samples, text).unwrap();
    fails_with(
        &lisa(&["eval", "--config", s(&no_samples), "--main", s(&main)]),
        "validation.samples: must lie in 1..=",
    );
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
        "outside the palette",
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// A Fill50K-format folder of `n` procedural examples (512-px style: outlines and targets
/// written at 4× the model resolution, so the loader's resizing is exercised).
fn fill50k_folder(dir: &Path, n: usize) {
    use lisa_trainer::data::{Dataset, FillCircles};
    let planar_png = |planar: &[f32], channels: usize, range: (f32, f32), path: PathBuf| {
        let byte = |v: f32| (((v - range.0) / (range.1 - range.0)).clamp(0.0, 1.0) * 255.0).round() as u8;
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let at = |c: usize| planar[(if channels == 1 { 0 } else { c }) * 64 * 64 + (y * 64 + x) as usize];
            image::Rgb([byte(at(0)), byte(at(1)), byte(at(2))])
        });
        img.save(path).unwrap();
    };
    let set = FillCircles { resolution: 64, len: n, seed: 9 };
    std::fs::create_dir_all(dir.join("source")).unwrap();
    std::fs::create_dir_all(dir.join("target")).unwrap();
    let mut lines = String::new();
    for i in 0..n {
        let e = set.get(i).unwrap();
        planar_png(&e.hint, 1, (0.0, 1.0), dir.join(format!("source/{i}.png")));
        planar_png(&e.image, 3, (-1.0, 1.0), dir.join(format!("target/{i}.png")));
        let prompt = e.prompt;
        lines +=
            &format!("{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"{prompt}\"}}\n");
    }
    std::fs::write(dir.join("prompt.json"), lines).unwrap();
}

#[test]
fn demo_compare_writes_plot_summary_grids_and_metrics() {
    let d = workdir("demo");
    let cfg = d.join("tiny.toml");
    let main = tiny_prior(&d, 2, 2);
    let out_dir = d.join("demo");
    let out = lisa(&[
        "demo",
        "--compare",
        "--config",
        s(&cfg),
        "--main",
        s(&main),
        "--max-train-steps",
        "4",
        "--validation-steps",
        "2",
        "--output-dir",
        s(&out_dir),
    ]);
    ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("lisa") && stdout.contains("baseline") && stdout.contains("final iou"), "{stdout}");
    assert!(out_dir.join("comparison.png").is_file());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    for arm in ["lisa", "baseline"] {
        let a = &summary["arms"][arm];
        let steps: Vec<u64> = a["validations"].as_array().unwrap().iter().map(|v| v[0].as_u64().unwrap()).collect();
        assert_eq!(steps, [0, 2, 4], "{arm}: validations at start, every 2 steps and at the end");
        assert_eq!(a["steps"], 4);
        for step in [0, 2, 4] {
            assert!(out_dir.join(format!("{arm}/validation-{step:06}.png")).is_file());
        }
        let metrics = std::fs::read_to_string(out_dir.join(format!("{arm}/metrics.jsonl"))).unwrap();
        assert_eq!(metrics.lines().count(), 5, "{arm}: a line for the start validation and one per step");
    }
    // Before any step the side branch adds exactly zero: both arms start at the prior's IoU.
    assert_eq!(summary["arms"]["lisa"]["validations"][0], summary["arms"]["baseline"]["validations"][0]);

    // Run again into the same folder: the demo replaces its own outputs...
    let again = |dir: &Path| {
        lisa(&[
            "demo",
            "--config",
            s(&cfg),
            "--main",
            s(&main),
            "--max-train-steps",
            "2",
            "--validation-steps",
            "2",
            "--output-dir",
            s(dir),
        ])
    };
    ok(&again(&out_dir));
    assert!(!out_dir.join("lisa/validation-000004.png").exists(), "the earlier run's grids are replaced");
    // ...but never deletes what it did not write.
    std::fs::write(out_dir.join("lisa/notes.txt"), "mine").unwrap();
    fails_with(&again(&out_dir), "did not write (notes.txt)");
    assert!(out_dir.join("lisa/notes.txt").is_file() && out_dir.join("lisa/metrics.jsonl").is_file());
    let foreign = d.join("mine");
    std::fs::create_dir_all(foreign.join("lisa")).unwrap();
    std::fs::write(foreign.join("lisa/metrics.jsonl"), "{}").unwrap();
    fails_with(&again(&foreign), "did not write");
    assert!(foreign.join("lisa/metrics.jsonl").is_file());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn trains_on_a_fill50k_folder_and_reports_its_bad_files() {
    let d = workdir("fill50k");
    let cfg = d.join("tiny.toml");
    let data = d.join("fill50k");
    fill50k_folder(&data, 6);
    let main = tiny_prior(&d, 1, 2);
    let train = || {
        lisa(&[
            "train",
            "--config",
            s(&cfg),
            "--main",
            s(&main),
            "--train-data-dir",
            s(&data),
            "--max-train-steps",
            "2",
            "--train-batch-size",
            "6",
            "--validation-steps",
            "0",
            "--output-dir",
            s(&d.join("run")),
        ])
    };
    // prompt.json with a UTF-8 byte-order mark (as some editors write it) reads the same.
    let list = std::fs::read_to_string(data.join("prompt.json")).unwrap();
    std::fs::write(data.join("prompt.json"), format!("\u{feff}{list}")).unwrap();
    let out = train();
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("6 examples"));
    // The data is known by its contents, images included: a resume on an edited image (same
    // prompt.json) is refused, naming the data.
    std::fs::copy(data.join("target/1.png"), data.join("target/0.png")).unwrap();
    let run = d.join("run");
    let resume = [
        "train",
        "--config",
        s(&cfg),
        "--main",
        s(&main),
        "--train-data-dir",
        s(&data),
        "--max-train-steps",
        "3",
        "--train-batch-size",
        "6",
        "--validation-steps",
        "0",
        "--output-dir",
        s(&run),
        "--resume-from-checkpoint",
        "latest",
    ];
    fails_with(&lisa(&resume), "trained on other data");
    // A corrupt image is named, with its line, before any step: the first in file order,
    // though the examples are checked on several threads.
    std::fs::write(data.join("target/3.png"), b"\x89PNG\r\n\x1a\nnot an image").unwrap();
    std::fs::write(data.join("target/5.png"), b"\x89PNG\r\n\x1a\nnot an image either").unwrap();
    std::fs::remove_dir_all(d.join("run")).unwrap();
    fails_with(&train(), "target/3.png");
    fails_with(&train(), "line 4 of prompt.json");
    assert!(!d.join("run/metrics.jsonl").exists(), "nothing trained");
    // A listed file that is missing is named when the folder is opened.
    std::fs::remove_file(data.join("source/5.png")).unwrap();
    fails_with(&train(), "source/5.png");
    // A bad line of prompt.json is named with its line number.
    std::fs::write(data.join("prompt.json"), "{\"source\": \"source/0.png\"\n").unwrap();
    fails_with(&train(), "prompt.json:1");
    std::fs::remove_dir_all(d).unwrap();
}

/// An installed `lisa` needs no source tree: the demo's run file and prior are compiled in,
/// and the demo runs from any working directory (the prior is written beside its outputs).
#[test]
fn the_demo_runs_from_any_directory_with_the_shipped_assets() {
    let d = workdir("shipped");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lisa"))
        .current_dir(&d)
        .args(["demo", "--max-train-steps", "1", "--validation-steps", "1", "--output-dir", "out"])
        .output()
        .unwrap();
    let err = ok(&out);
    assert!(err.contains("train lisa") && err.contains("hook down_1"), "{err}");
    let shipped = std::fs::read(d.join("out/prior.safetensors")).unwrap();
    let source = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/prior.safetensors")).unwrap();
    assert!(shipped == source, "the prior written is the shipped one");
    assert!(d.join("out/lisa/metrics.jsonl").is_file() && d.join("out/summary.json").is_file());
    // That prior, given back to the demo in the same folder, is the user's input now: kept.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_lisa"))
        .current_dir(&d)
        .args(["demo", "--main", "out/prior.safetensors", "--max-train-steps", "1", "--validation-steps", "1"])
        .args(["--output-dir", "out"])
        .output()
        .unwrap();
    ok(&again);
    assert!(std::fs::read(d.join("out/prior.safetensors")).unwrap() == source);
    // No source path is compiled into the command (it would break once installed).
    for file in ["demo.rs", "study/mod.rs", "shipped.rs"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file)).unwrap();
        assert!(!text.contains("env!(\"CARGO_MANIFEST_DIR\")"), "{file} reads the source tree at run time");
    }
}
