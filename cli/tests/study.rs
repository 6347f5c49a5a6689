//! `lisa study` on a tiny configuration: the grid, its rows and summary, skipping finished
//! runs, resuming an interrupted one exactly, and refusing what it must not touch.

use std::path::{Path, PathBuf};
mod common;

use common::{TINY, fails_with, lisa, ok, s, tiny_prior};

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-study-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("tiny.toml"), TINY).unwrap();
    d
}

const STUDY: &str = r#"
base = "tiny.toml"
main = "main.safetensors"
seeds = [0, 1]
validation_steps = 2
checkpointing_steps = 2
thresholds = [0.1, 0.9]

[[arm]]
name = "baseline"
set.train.mode = "baseline"
set.train.max_train_steps = 4

[[arm]]
name = "lisa"
[arm.set.train]
mode = "lisa"
max_train_steps = 4
lisa = { lambda = 1.0 }
"#;

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn study_runs_the_grid_skips_finished_runs_and_resumes_exactly() {
    let d = workdir("grid");
    tiny_prior(&d, 2, 2);
    std::fs::write(d.join("study.toml"), STUDY).unwrap();
    let out = d.join("out");
    let study = || lisa(&["study", "--config", s(&d.join("study.toml")), "--output-dir", s(&out)]);
    let first = study();
    ok(&first);

    // One row per validation: 2 arms × 2 seeds × (step 0, 2, 4).
    let before = rows(&out);
    assert_eq!(before.len(), 12);
    for arm in ["baseline", "lisa"] {
        for seed in [0, 1] {
            let steps: Vec<u64> = before
                .iter()
                .filter(|r| r["arm"] == arm && r["seed"] == seed)
                .map(|r| r["step"].as_u64().unwrap())
                .collect();
            assert_eq!(steps, [0, 2, 4], "{arm} seed {seed}");
        }
    }
    // Before any step the side branch adds zero: every arm and seed starts at the prior's IoU.
    let starts: Vec<&serde_json::Value> = before.iter().filter(|r| r["step"] == 0).map(|r| &r["iou"]).collect();
    assert!(starts.windows(2).all(|w| w[0] == w[1]), "{starts:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["reference"], "baseline");
    for arm in ["baseline", "lisa"] {
        let a = &summary["arms"][arm];
        assert_eq!(a["seeds"], serde_json::json!([0, 1]));
        assert_eq!(a["final_iou"]["n"], 2);
        assert_eq!(a["steps_to_threshold"]["0.10"]["runs"], 2);
        assert_eq!(a["iou_curve"].as_array().unwrap().len(), 3);
    }
    assert!(summary["arms"]["lisa"]["final_lisa_loss"]["mean"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["arms"]["baseline"]["final_lisa_loss"]["mean"].as_f64().unwrap(), 0.0);
    assert_eq!(summary["arms"]["lisa"]["final_tau_explained"]["n"], 2);
    assert!(summary["arms"]["baseline"]["final_tau_explained"].is_null());
    // The shares of τ per timestep bucket, at every validation: zero before any step (zero
    // convolutions, zero-initialised decoder output), no decoder share in the baseline.
    for r in &before {
        let (control, decoder) =
            (r["tau_share_control"].as_array().unwrap(), r["tau_share_decoder"].as_array().unwrap());
        assert_eq!((control.len(), decoder.len()), (5, 5), "{r}");
        assert_eq!(decoder.iter().all(|d| d.is_null()), r["arm"] == "baseline", "{r}");
        if r["step"] == 0 {
            assert!(control.iter().chain(decoder).all(|v| v.is_null() || v.as_f64() == Some(0.0)), "{r}");
        }
    }
    let shares =
        |arm: &str, by: &str| summary["arms"][arm]["final_tau_share_by_bucket"][by].as_array().unwrap().clone();
    assert_eq!(shares("lisa", "decoder").len(), 5);
    assert!(shares("lisa", "control").iter().chain(&shares("lisa", "decoder")).all(|b| b["n"] == 2));
    assert!(shares("baseline", "decoder").is_empty());
    assert_eq!(shares("baseline", "control").len(), 5);
    // The linear probe at every validation, and over seeds at the end.
    assert!(before.iter().all(|r| r["probe_r2"].as_array().is_some_and(|a| a.len() == 3)), "{before:?}");
    for arm in ["baseline", "lisa"] {
        let r2 = summary["arms"][arm]["final_probe_r2"].as_array().unwrap();
        assert!(r2.len() == 3 && r2.iter().all(|c| c["n"] == 2 && c["mean"].as_f64().unwrap() <= 1.0), "{r2:?}");
        assert_eq!(summary["arms"][arm]["probe_r2_curve"].as_array().unwrap().len(), 3);
    }
    assert!(out.join("study.png").is_file() && out.join("tau_share.png").is_file() && out.join("probe.png").is_file());
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(table.contains("| lisa |") && table.contains("| baseline |"), "{table}");
    assert!(
        table.contains("| lisa | the LISA decoder |") && table.contains("| baseline | the control residuals |"),
        "{table}"
    );
    assert!(table.contains("linear probe"), "{table}");

    // Each run keeps its settings, the prior first.
    let kept = std::fs::read_to_string(out.join("lisa/seed-0/run.toml")).unwrap();
    assert!(kept.starts_with("# prior: ") && kept.lines().next().unwrap().ends_with("main.safetensors"), "{kept}");

    // Again: every run is done, nothing trains, the same rows.
    let again = study();
    let err = ok(&again);
    assert!(!err.contains("validation iou"), "a finished run trained again:\n{err}");
    assert_eq!(rows(&out), before);

    // Interrupted after its checkpoint at step 2: it resumes from there and ends where the
    // uninterrupted run ended (the rows are equal to the bit).
    let run = out.join("lisa/seed-1");
    std::fs::remove_file(run.join("done.json")).unwrap();
    std::fs::remove_dir_all(run.join("checkpoint-4")).unwrap();
    let resumed = study();
    assert!(ok(&resumed).contains("resumed from"), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(rows(&out), before);

    // A changed arm is refused, finished runs included (they are not reported as done under
    // the new settings), the difference named.
    std::fs::write(d.join("study.toml"), STUDY.replace("lambda = 1.0", "lambda = 0.5")).unwrap();
    fails_with(&study(), "train.lisa.lambda: 1.0 vs 0.5");
    // A run in progress likewise.
    std::fs::remove_file(run.join("done.json")).unwrap();
    fails_with(&study(), "changed since");
    std::fs::write(d.join("study.toml"), STUDY).unwrap();
    ok(&study());
    // Another prior at the same path: its contents differ, the runs are refused.
    let prior = std::fs::read(d.join("main.safetensors")).unwrap();
    let mut edited = prior.clone();
    let header = u64::from_le_bytes(prior[..8].try_into().unwrap()) as usize;
    edited[8 + header] ^= 1; // the lowest mantissa bit of the first weight
    std::fs::write(d.join("main.safetensors"), &edited).unwrap();
    fails_with(&study(), "the prior");
    std::fs::write(d.join("main.safetensors"), &prior).unwrap();
    // More steps for one arm: its finished runs continue from their last checkpoint.
    let longer = STUDY.replace("max_train_steps = 4\nlisa", "max_train_steps = 6\nlisa");
    std::fs::write(d.join("study.toml"), longer).unwrap();
    let err = ok(&study());
    assert!(err.contains("steps: 4 vs 6; continuing from its last checkpoint"), "{err}");
    let steps: Vec<u64> = rows(&out)
        .iter()
        .filter(|r| r["arm"] == "lisa" && r["seed"] == 0)
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 2, 4, 6]);
}

/// Every arm's model is checked against its prior before the first arm trains.
#[test]
fn study_checks_every_arms_model_against_its_prior_first() {
    let d = workdir("models");
    tiny_prior(&d, 2, 2);
    let other = STUDY.replace("name = \"lisa\"", "name = \"lisa\"\n[arm.set.model.unet]\nchannels = [8, 8]");
    std::fs::write(d.join("study.toml"), other).unwrap();
    let out = d.join("out");
    fails_with(&lisa(&["study", "--config", s(&d.join("study.toml")), "--output-dir", s(&out)]), "another model");
    assert!(!out.join("baseline").exists(), "the first arm did not train");
}

#[test]
fn study_refuses_bad_files_and_folders_it_did_not_make() {
    let d = workdir("bad");
    tiny_prior(&d, 2, 2);
    let run = |text: &str, out: &Path| {
        std::fs::write(d.join("study.toml"), text).unwrap();
        lisa(&["study", "--config", s(&d.join("study.toml")), "--output-dir", s(out), "--dry-run"])
    };
    let out = d.join("out");
    fails_with(&run(&STUDY.replace("seeds = [0, 1]", "seeds = [0, 0]"), &out), "twice");
    fails_with(&run(&STUDY.replace("seeds = [0, 1]", "seeds = []"), &out), "at least one seed");
    fails_with(&run(&STUDY.replace("name = \"lisa\"", "name = \"baseline\""), &out), "defined twice");
    fails_with(&run(&STUDY.replace("name = \"lisa\"", "name = \"../x\""), &out), "arm name");
    fails_with(&run(&format!("{STUDY}\nunknown = 1\n"), &out), "unknown field");
    fails_with(&run(&STUDY.replace("lambda", "lamda"), &out), "unknown field");
    fails_with(&run(&STUDY.replace("thresholds = [0.1, 0.9]", "thresholds = [1.5]"), &out), "thresholds");
    fails_with(&run(&format!("reference = \"nope\"\n{STUDY}"), &out), "reference arm");
    fails_with(&run(&STUDY.replace("main.safetensors", "missing.safetensors"), &out), "does not exist");
    let arm_prior = |file: &str| STUDY.replace("name = \"lisa\"", &format!("name = \"lisa\"\nmain = \"{file}\""));
    fails_with(&run(&arm_prior("missing.safetensors"), &out), "of arm \"lisa\" does not exist");
    // An arm's own prior (here a copy of the study's) is planned like any other.
    std::fs::copy(d.join("main.safetensors"), d.join("other.safetensors")).unwrap();
    let own = run(&arm_prior("other.safetensors"), &out);
    assert_eq!(String::from_utf8_lossy(&own.stdout).matches("to run").count(), 4, "{own:?}");

    // A folder with the user's files and no study marker is never written into.
    let theirs = d.join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
    fails_with(&run(STUDY, &theirs), "did not write");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 1);

    // The dry run lists the plan and trains nothing.
    let plan = run(STUDY, &out);
    ok(&plan);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert_eq!(text.matches("to run").count(), 4, "{text}");
    assert!(!out.exists(), "a dry run writes nothing");
}
