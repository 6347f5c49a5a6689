//! `lisa study`: a grid of arms × seeds of control training on the toy task, resumable, with
//! one JSONL row per validation, a summary over seeds and a plot with seed bands.
//!
//! Each arm is the base run file with the arm's `set` table merged over it; each seed sets
//! `[train] seed`, which seeds the data order, timesteps, noise and the decoder's weights, so
//! every arm of one seed sees the same data, timesteps and noise. Runs live in
//! `<output-dir>/<arm>/seed-<seed>/`; a run with `done.json` is skipped, an interrupted one
//! resumes from its latest checkpoint, and a run whose settings changed since it started is
//! refused (it would mix two configurations).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use serde::Deserialize;

use crate::config::RunFile;
use crate::image::save_png;
use crate::plot::{BASELINE_BLUE, LISA_ORANGE, Panel, Series, XAxis, line_chart};
use crate::run_dir::{CheckpointArgs, LOCK, RunDir};
use crate::train::{LoopOptions, Start, train_arm};
use lisa_trainer::weights::write_atomic;

/// The demo's assets (run file and prior), the defaults of a study file.
const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets");
/// The marker of folders `lisa study` made.
const MARKER: &str = ".lisa-study";
/// The resolved run file of a run, kept to detect a changed configuration on resume.
const RUN_FILE: &str = "run.toml";
/// Written when a run has finished.
const DONE: &str = "done.json";

/// Flags of `lisa study`.
#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study file (TOML): `seeds`, `[[arm]]` tables, optional `base`, `main`,
    /// `validation_steps`, `thresholds`, `reference`, `checkpointing_steps`.
    #[arg(long)]
    config: PathBuf,
    /// Where the runs, results.jsonl, summary.json and study.png go.
    #[arg(long, default_value = "runs/study")]
    output_dir: PathBuf,
    /// Print the plan (each run, done or not) and train nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The study file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyFile {
    /// The run file every arm starts from (relative paths: from the study file's folder;
    /// default: the demo's run file).
    base: Option<PathBuf>,
    /// The pretrained prior (default: the shipped one).
    main: Option<PathBuf>,
    /// The seeds; every arm runs each.
    seeds: Vec<u64>,
    /// Validate every N steps (and at step 0 and at the end).
    #[serde(default = "default_validation_steps")]
    validation_steps: u64,
    /// IoU thresholds whose first crossing is reported, in steps and seconds.
    #[serde(default = "default_thresholds")]
    thresholds: Vec<f32>,
    /// The arm the others are compared with (default: `baseline` when there is one).
    reference: Option<String>,
    /// Checkpoint every N steps, for resuming (default: the validation interval).
    checkpointing_steps: Option<u64>,
    /// The arms.
    #[serde(rename = "arm")]
    arms: Vec<ArmSpec>,
}

fn default_validation_steps() -> u64 {
    60
}

fn default_thresholds() -> Vec<f32> {
    vec![0.5, 0.6, 0.7]
}

/// One arm: a name, the run-file keys it sets over the base, and optionally its own prior.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArmSpec {
    name: String,
    /// This arm's pretrained prior (default: the study's `main`); relative paths from the study
    /// file's folder. Its model description decides the networks, as for the study's prior.
    main: Option<PathBuf>,
    /// Run-file keys, as in a run file (`set.train.mode = "baseline"`,
    /// `[arm.set.model.decoder] hook = "mid"`).
    #[serde(default)]
    set: toml::Table,
}

/// One finished run, as read back from its metrics.
#[derive(Debug, Clone)]
struct RunResult {
    /// `(step, IoU, colour error)` of every validation.
    validations: Vec<(u64, f32, f32)>,
    /// Mean LISA loss and main loss over the last tenth of the steps.
    final_losses: (f64, f64),
    /// `1 − mean LISA distance / mean distance of a zero decoder` over the last tenth of the
    /// steps: the share of τ the decoder explains (NaN without LISA).
    explained: f64,
    /// Training seconds per step (validation excluded).
    seconds_per_step: f64,
    /// The shares of τ per timestep bucket at each validation that logged them:
    /// `(step, decoder shares (None without a decoder), control shares)`.
    tau_shares: Vec<TauRow>,
    /// `(step, held-out R² of the linear probe per target: centre x, centre y, radius)`.
    probe_r2: Vec<(u64, Vec<f64>)>,
}

/// `(step, decoder share per bucket (None without a decoder), control share per bucket)`.
type TauRow = (u64, Vec<Option<f64>>, Vec<f64>);

impl RunResult {
    fn steps_to(&self, iou: f32) -> Option<u64> {
        self.validations.iter().find(|v| v.1 >= iou).map(|v| v.0)
    }
    fn final_iou(&self) -> f32 {
        self.validations.last().map_or(f32::NAN, |v| v.1)
    }
    fn final_colour_error(&self) -> f32 {
        self.validations.last().map_or(f32::NAN, |v| v.2)
    }
}

/// Runs `lisa study`.
pub fn run<B: Backend>(a: StudyArgs, device: B::Device) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.config).with_context(|| format!("cannot read study file {}", a.config.display()))?;
    let study: StudyFile = toml::from_str(&text).with_context(|| format!("study file {}", a.config.display()))?;
    let here = a.config.parent().unwrap_or(Path::new("."));
    let relative = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { here.join(p) };
    let base_path = study.base.as_deref().map(relative).unwrap_or_else(|| Path::new(ASSETS).join("demo.toml"));
    let main = study.main.as_deref().map(relative).unwrap_or_else(|| Path::new(ASSETS).join("prior.safetensors"));
    if !main.is_file() {
        bail!("study file {}: the prior {} does not exist", a.config.display(), main.display());
    }
    let base_text = std::fs::read_to_string(&base_path)
        .with_context(|| format!("cannot read the base run file {}", base_path.display()))?;
    let base: toml::Table =
        toml::from_str(&base_text).with_context(|| format!("base run file {}", base_path.display()))?;
    let plan = plan(&study, &base, &main, &a.config, &relative)?;
    let reference = match &study.reference {
        Some(r) if !study.arms.iter().any(|a| &a.name == r) => {
            bail!("study file {}: reference arm {r:?} is not one of the arms", a.config.display())
        }
        Some(r) => Some(r.clone()),
        None => study.arms.iter().find(|a| a.name == "baseline").map(|a| a.name.clone()),
    };

    claim(&a.output_dir, !a.dry_run)?;
    let mut stdout = std::io::stdout().lock();
    for run in &plan {
        let state = if run.dir(&a.output_dir).join(DONE).is_file() { "done" } else { "to run" };
        writeln!(stdout, "{:>12} seed {:<6} {state}", run.arm, run.seed).context("cannot write to standard output")?;
    }
    if a.dry_run {
        return Ok(());
    }
    drop(stdout);
    for run in &plan {
        run_one::<B>(run, &study, &a.output_dir, device.clone())?;
    }

    // Read every run back from its metrics (complete whether or not it was resumed).
    let mut results: BTreeMap<String, Vec<(u64, RunResult)>> = BTreeMap::new();
    let mut rows = String::new();
    for run in &plan {
        let r = read_run(&run.dir(&a.output_dir))?;
        for &(step, iou, colour) in &r.validations {
            let mut row =
                serde_json::json!({"arm": run.arm, "seed": run.seed, "step": step, "iou": iou, "colour_error": colour});
            if let Some((_, dec, ctrl)) = r.tau_shares.iter().find(|t| t.0 == step) {
                row["tau_share_decoder"] = serde_json::json!(dec);
                row["tau_share_control"] = serde_json::json!(ctrl);
            }
            if let Some((_, r2)) = r.probe_r2.iter().find(|p| p.0 == step) {
                row["probe_r2"] = serde_json::json!(r2);
            }
            rows += &format!("{row}\n");
        }
        results.entry(run.arm.clone()).or_default().push((run.seed, r));
    }
    write_atomic(&a.output_dir.join("results.jsonl"), rows.as_bytes())?;
    let order: Vec<String> = study.arms.iter().map(|a| a.name.clone()).collect();
    let summary = summarise(&order, &results, &study.thresholds, reference.as_deref(), B::name());
    write_atomic(&a.output_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    save_png(&band_plot(&order, &results, &study.thresholds)?, &a.output_dir.join("study.png"))?;
    if let Some(panel) = tau_share_panel(&order, &results) {
        save_png(&line_chart(&[panel], 860, 420)?, &a.output_dir.join("tau_share.png"))?;
    }
    if let Some(panel) = probe_panel(&order, &results) {
        save_png(&line_chart(&[panel], 860, 420)?, &a.output_dir.join("probe.png"))?;
    }
    let table = summary_table(&order, &summary, &study.thresholds);
    std::io::stdout().lock().write_all(table.as_bytes()).context("cannot write to standard output")?;
    Ok(())
}

/// One run of the grid.
struct PlannedRun {
    arm: String,
    seed: u64,
    /// The resolved run file (base + arm + seed), as TOML, after a comment naming the prior.
    run_file: String,
    file: RunFile,
    /// The arm's prior.
    main: PathBuf,
}

impl PlannedRun {
    fn dir(&self, out: &Path) -> PathBuf {
        out.join(&self.arm).join(format!("seed-{}", self.seed))
    }
}

/// Every run, each run file resolved and checked before anything trains.
fn plan(
    study: &StudyFile,
    base: &toml::Table,
    main: &Path,
    origin: &Path,
    relative: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<PlannedRun>> {
    let origin = origin.display();
    if study.seeds.is_empty() || study.arms.is_empty() {
        bail!("study file {origin}: needs at least one seed and one [[arm]]");
    }
    if study.validation_steps == 0 {
        bail!("study file {origin}: validation_steps must be at least 1");
    }
    if study.thresholds.iter().any(|t| !(0.0..=1.0).contains(t)) {
        bail!("study file {origin}: thresholds are IoUs in [0, 1]");
    }
    let mut seeds = study.seeds.clone();
    seeds.sort_unstable();
    seeds.dedup();
    if seeds.len() != study.seeds.len() {
        bail!("study file {origin}: a seed is listed twice");
    }
    let mut names = std::collections::HashSet::new();
    let mut plan = Vec::new();
    for arm in &study.arms {
        let valid = !arm.name.is_empty()
            && arm.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !arm.name.starts_with('.');
        if !valid {
            bail!("study file {origin}: arm name {:?} must be letters, digits, '-' or '_'", arm.name);
        }
        if !names.insert(arm.name.as_str()) {
            bail!("study file {origin}: arm {:?} is defined twice", arm.name);
        }
        let main = arm.main.as_deref().map(relative).unwrap_or_else(|| main.to_path_buf());
        if !main.is_file() {
            bail!("study file {origin}: the prior {} of arm {:?} does not exist", main.display(), arm.name);
        }
        for &seed in &study.seeds {
            let mut table = base.clone();
            merge(&mut table, &arm.set);
            let train = table.entry("train").or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(train) = train.as_table_mut() else {
                bail!("study file {origin}: [train] of arm {:?} is not a table", arm.name);
            };
            // The seed is the study's: an arm may not pin it.
            train.insert("seed".into(), toml::Value::Integer(seed as i64));
            let run_file = toml::to_string(&table)?;
            let mut file = RunFile::from_toml(&run_file, &format!("study file {origin}, arm {:?}", arm.name))?;
            file.resolve_model(&main)?;
            // The prior is part of the settings: a run whose prior changed is not resumed.
            let run_file = format!("# prior: {}\n{run_file}", main.display());
            plan.push(PlannedRun { arm: arm.name.clone(), seed, run_file, file, main: main.clone() });
        }
    }
    Ok(plan)
}

/// `over` merged into `into`, tables key by key, other values replaced.
fn merge(into: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Trains one run unless it is done; resumes it from its latest checkpoint if it started.
fn run_one<B: Backend>(run: &PlannedRun, study: &StudyFile, out: &Path, device: B::Device) -> Result<()> {
    let dir = run.dir(out);
    if dir.join(DONE).is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let kept = dir.join(RUN_FILE);
    let started = kept.is_file();
    if started {
        let before = std::fs::read_to_string(&kept).with_context(|| format!("cannot read {}", kept.display()))?;
        if before != run.run_file {
            bail!(
                "the settings of arm {:?} changed since {} started; finish or remove that run, or use another --output-dir",
                run.arm,
                dir.display()
            );
        }
    } else {
        write_atomic(&kept, run.run_file.as_bytes())?;
    }
    let has_checkpoint = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"));
    let label = format!("{}/{}", run.arm, run.seed);
    let options = LoopOptions {
        latent_validation: None,
        output_dir: &dir,
        validation_steps: study.validation_steps,
        validate_at_start: true,
        checkpoints: CheckpointArgs {
            checkpointing_steps: study.checkpointing_steps.unwrap_or(study.validation_steps),
            // Two, so that a run killed while writing one still has the one before.
            checkpoints_total_limit: Some(2),
            resume_from_checkpoint: has_checkpoint.then(|| "latest".to_string()),
            // A run that started here and stopped before its first checkpoint starts over:
            // its metrics are the study's own.
            overwrite: !has_checkpoint,
        },
        label: &label,
    };
    train_arm::<B>(&run.file, Start { main: &run.main, side: None }, device, &options)?;
    let done = serde_json::json!({"arm": run.arm, "seed": run.seed, "backend": B::name()});
    write_atomic(&dir.join(DONE), serde_json::to_string_pretty(&done)?.as_bytes())?;
    Ok(())
}

/// A finished run's validations, losses and speed from its `metrics.jsonl` (the speed: the
/// training-step rate of its last row, i.e. of the run's last uninterrupted stretch).
fn read_run(dir: &Path) -> Result<RunResult> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut validations = Vec::new();
    let mut losses: Vec<(f64, f64, f64)> = Vec::new();
    let mut steps_per_s = f64::NAN;
    let mut tau_shares = Vec::new();
    let mut probe_r2 = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: bad line", path.display()))?;
        let step = v["step"].as_u64().unwrap_or(0);
        if let Some(iou) = v["iou"].as_f64() {
            validations.push((step, iou as f32, v["colour_error"].as_f64().unwrap_or(f64::NAN) as f32));
        }
        if let (Some(lisa), Some(main)) = (v["lisa_loss"].as_f64(), v["main_loss"].as_f64()) {
            losses.push((lisa, main, v["lisa_zero_distance"].as_f64().unwrap_or(f64::NAN)));
        }
        if let Some(rate) = v["steps_per_s"].as_f64() {
            steps_per_s = rate;
        }
        if let (Some(dec), Some(ctrl)) = (v["tau_share_decoder"].as_array(), v["tau_share_control"].as_array()) {
            let control = ctrl.iter().map(|c| c.as_f64().unwrap_or(f64::NAN)).collect();
            tau_shares.push((step, dec.iter().map(serde_json::Value::as_f64).collect(), control));
        }
        if let Some(r2) = v["probe_r2"].as_array() {
            probe_r2.push((step, r2.iter().map(|c| c.as_f64().unwrap_or(f64::NAN)).collect()));
        }
    }
    let tail = &losses[losses.len() - losses.len().div_ceil(10)..];
    let mean = |f: fn(&(f64, f64, f64)) -> f64| tail.iter().map(f).sum::<f64>() / tail.len().max(1) as f64;
    let zero = mean(|l| l.2);
    let explained = if zero > 0.0 { 1.0 - mean(|l| l.0) / zero } else { f64::NAN };
    Ok(RunResult {
        validations,
        final_losses: (mean(|l| l.0), mean(|l| l.1)),
        explained,
        seconds_per_step: 1.0 / steps_per_s,
        tau_shares,
        probe_r2,
    })
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

fn stat(v: &[f64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    let (mean, std) = mean_std(v);
    serde_json::json!({"mean": mean, "std": std, "min": v.iter().copied().fold(f64::INFINITY, f64::min), "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max), "n": v.len()})
}

type Results = BTreeMap<String, Vec<(u64, RunResult)>>;

/// Per arm, over seeds: final IoU and colour error, steps and seconds to each threshold, the
/// step time, and against the reference arm: the step-time ratio and the speed-up to reach
/// the reference's mean final IoU (reference steps / arm steps, means over seeds).
fn summarise(
    order: &[String],
    results: &Results,
    thresholds: &[f32],
    reference: Option<&str>,
    backend: &str,
) -> serde_json::Value {
    let target = reference.and_then(|r| results.get(r)).map(|runs| {
        let finals: Vec<f64> = runs.iter().map(|(_, r)| r.final_iou() as f64).collect();
        mean_std(&finals).0 as f32
    });
    let steps_to_target = |arm: &str| -> Vec<f64> {
        match (target, results.get(arm)) {
            (Some(t), Some(runs)) => runs.iter().filter_map(|(_, r)| r.steps_to(t)).map(|s| s as f64).collect(),
            _ => Vec::new(),
        }
    };
    let ref_steps = reference.map(steps_to_target).map(|v| mean_std(&v).0);
    let ref_step_time = reference
        .and_then(|r| results.get(r))
        .map(|runs| mean_std(&runs.iter().map(|(_, r)| r.seconds_per_step).collect::<Vec<_>>()).0);
    let mut arms = serde_json::Map::new();
    for arm in order {
        let Some(runs) = results.get(arm) else { continue };
        let finals: Vec<f64> = runs.iter().map(|(_, r)| r.final_iou() as f64).collect();
        let colours: Vec<f64> = runs.iter().map(|(_, r)| r.final_colour_error() as f64).collect();
        let step_time: Vec<f64> = runs.iter().map(|(_, r)| r.seconds_per_step).collect();
        let mut per_threshold = serde_json::Map::new();
        for &t in thresholds {
            let steps: Vec<f64> = runs.iter().filter_map(|(_, r)| r.steps_to(t)).map(|s| s as f64).collect();
            let seconds: Vec<f64> =
                runs.iter().filter_map(|(_, r)| r.steps_to(t).map(|s| s as f64 * r.seconds_per_step)).collect();
            per_threshold.insert(
                format!("{t:.2}"),
                serde_json::json!({"steps": stat(&steps), "seconds": stat(&seconds), "reached": steps.len(), "runs": runs.len()}),
            );
        }
        let to_target = steps_to_target(arm);
        // Defined when every seed of the arm reached the target after step 0 (and so did the
        // reference's): reference steps / arm steps, means over seeds.
        let arm_steps = mean_std(&to_target).0;
        let speedup = match ref_steps {
            Some(r) if r > 0.0 && arm_steps > 0.0 && to_target.len() == runs.len() => Some(r / arm_steps),
            _ => None,
        };
        let curve: Vec<serde_json::Value> = curve_steps(runs)
            .into_iter()
            .map(|(step, vals)| serde_json::json!({"step": step, "iou": stat(&vals)}))
            .collect();
        arms.insert(
            arm.clone(),
            serde_json::json!({
                "seeds": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
                "final_iou": stat(&finals),
                "final_colour_error": stat(&colours),
                "steps_to_threshold": per_threshold,
                "seconds_per_step": stat(&step_time),
                "step_time_ratio": ref_step_time.map(|r| mean_std(&step_time).0 / r),
                "steps_to_reference_final_iou": stat(&to_target),
                "speedup_to_reference_final_iou": speedup,
                "final_lisa_loss": stat(&runs.iter().map(|(_, r)| r.final_losses.0).collect::<Vec<_>>()),
                "final_main_loss": stat(&runs.iter().map(|(_, r)| r.final_losses.1).collect::<Vec<_>>()),
                "final_tau_explained": stat(&runs.iter().map(|(_, r)| r.explained).filter(|v| v.is_finite()).collect::<Vec<_>>()),
                "final_tau_share_by_bucket": final_tau_shares(runs),
                "final_probe_r2": final_probe_r2(runs),
                "probe_r2_curve": probe_curve(runs)
                    .into_iter()
                    .map(|(step, vals)| serde_json::json!({"step": step, "mean_r2": stat(&vals)}))
                    .collect::<Vec<_>>(),
                "iou_curve": curve,
            }),
        );
    }
    serde_json::json!({
        "backend": backend,
        "reference": reference,
        "reference_final_iou": target,
        "thresholds": thresholds,
        "arms": arms,
    })
}

/// Per timestep bucket, over seeds, the shares of τ at each run's last validation that logged
/// them: `{"decoder": [stat per bucket], "control": [stat per bucket]}` (decoder empty for a
/// baseline).
fn final_tau_shares(runs: &[(u64, RunResult)]) -> serde_json::Value {
    let finals: Vec<&TauRow> = runs.iter().filter_map(|(_, r)| r.tau_shares.last()).collect();
    let buckets = finals.iter().map(|f| f.2.len()).min().unwrap_or(0);
    let per_bucket = |pick: &dyn Fn(&TauRow, usize) -> Option<f64>| {
        (0..buckets)
            .map(|b| finals.iter().filter_map(|f| pick(f, b)).filter(|v| v.is_finite()).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .map(|v| stat(&v))
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "buckets": buckets,
        "decoder": per_bucket(&|f, b| f.1.get(b).copied().flatten()),
        "control": per_bucket(&|f, b| f.2.get(b).copied()),
    })
}

/// Per probe target (centre x, centre y, radius), over seeds, the held-out R² at each run's
/// last validation that logged it.
fn final_probe_r2(runs: &[(u64, RunResult)]) -> Vec<serde_json::Value> {
    let finals: Vec<&Vec<f64>> = runs.iter().filter_map(|(_, r)| r.probe_r2.last().map(|p| &p.1)).collect();
    let targets = finals.iter().map(|f| f.len()).min().unwrap_or(0);
    (0..targets).map(|c| stat(&finals.iter().map(|f| f[c]).collect::<Vec<_>>())).collect()
}

/// The probe's R² averaged over its targets, of every seed at each step all seeds logged.
fn probe_curve(runs: &[(u64, RunResult)]) -> Vec<(u64, Vec<f64>)> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (_, r) in runs {
        for (step, r2) in &r.probe_r2 {
            by_step.entry(*step).or_default().push(r2.iter().sum::<f64>() / r2.len().max(1) as f64);
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == runs.len()).collect()
}

/// The IoU of every seed at each validated step all seeds share.
fn curve_steps(runs: &[(u64, RunResult)]) -> Vec<(u64, Vec<f64>)> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (_, r) in runs {
        for &(s, iou, _) in &r.validations {
            by_step.entry(s).or_default().push(iou as f64);
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == runs.len()).collect()
}

/// The printed summary: one line per arm.
fn summary_table(order: &[String], summary: &serde_json::Value, thresholds: &[f32]) -> String {
    let pm = |v: &serde_json::Value| match (v["mean"].as_f64(), v["std"].as_f64()) {
        (Some(m), Some(s)) => format!("{m:.3} ± {s:.3}"),
        _ => "-".into(),
    };
    let mut out = format!("\nstudy on {} (mean ± std over seeds)\n", summary["backend"].as_str().unwrap_or("?"));
    out += "| arm | final IoU | colour error | ";
    for t in thresholds {
        out += &format!("steps to IoU {t:.2} (reached) | ");
    }
    out += "speed-up to the reference's final IoU | step time ratio | τ explained by the decoder |\n";
    out += &"|---".repeat(6 + thresholds.len());
    out += "|\n";
    for arm in order {
        let a = &summary["arms"][arm];
        out += &format!("| {arm} | {} | {} | ", pm(&a["final_iou"]), pm(&a["final_colour_error"]));
        for t in thresholds {
            let th = &a["steps_to_threshold"][format!("{t:.2}")];
            let steps = &th["steps"];
            let cell = match steps["mean"].as_f64() {
                Some(m) => format!("{m:.0} ± {:.0}", steps["std"].as_f64().unwrap_or(0.0)),
                None => "-".into(),
            };
            out += &format!("{cell} ({}/{}) | ", th["reached"], th["runs"]);
        }
        let speedup = a["speedup_to_reference_final_iou"].as_f64().map_or("-".into(), |v| format!("{v:.2}×"));
        let ratio = a["step_time_ratio"].as_f64().map_or("-".into(), |v| format!("{v:.2}"));
        out += &format!("{speedup} | {ratio} | {} |\n", pm(&a["final_tau_explained"]));
    }
    if order.iter().any(|arm| summary["arms"][arm]["final_probe_r2"].as_array().is_some_and(|a| !a.is_empty())) {
        out += "\nlinear probe from the hooked side feature to the circle, held-out R² at the last validation\n";
        out += "| arm | centre x | centre y | radius |\n|---|---|---|---|\n";
        for arm in order {
            let Some(r2) = summary["arms"][arm]["final_probe_r2"].as_array().filter(|a| !a.is_empty()) else {
                continue;
            };
            out += &format!("| {arm} |");
            for c in r2 {
                out += &format!(" {} |", pm(c));
            }
            out += "\n";
        }
    }
    let buckets =
        order.iter().filter_map(|arm| summary["arms"][arm]["final_tau_share_by_bucket"]["buckets"].as_u64()).max();
    if let Some(n @ 1..) = buckets {
        out += "\nshare of τ explained at the last validation, per timestep bucket (t/T), mean ± std over seeds\n| arm | by |";
        for b in 0..n {
            out += &format!(" {:.1}–{:.1} |", b as f64 / n as f64, (b + 1) as f64 / n as f64);
        }
        out += "\n";
        out += &"|---".repeat(2 + n as usize);
        out += "|\n";
        for arm in order {
            let shares = &summary["arms"][arm]["final_tau_share_by_bucket"];
            for (by, key) in [("the control residuals", "control"), ("the LISA decoder", "decoder")] {
                let Some(cells) = shares[key].as_array().filter(|c| !c.is_empty()) else { continue };
                out += &format!("| {arm} | {by} |");
                for c in cells {
                    out += &format!(" {} |", pm(c));
                }
                out += "\n";
            }
        }
    }
    out
}

/// Colours of arms other than `baseline` and `lisa`, in study-file order.
const OTHERS: [[u8; 3]; 4] = [[40, 160, 60], [180, 40, 160], [120, 120, 120], [200, 40, 40]];

/// The project's baseline blue and LISA orange, then [`OTHERS`].
fn colour_of(order: &[String], arm: &str) -> [u8; 3] {
    match arm {
        "baseline" => BASELINE_BLUE,
        "lisa" => LISA_ORANGE,
        _ => {
            let others = order.iter().filter(|a| *a != "baseline" && *a != "lisa");
            OTHERS[others.take_while(|a| *a != arm).count() % OTHERS.len()]
        }
    }
}

/// `colour` two thirds of the way to white: the seed ranges and the decoder's lines.
fn lighter(colour: [u8; 3]) -> [u8; 3] {
    colour.map(|c| ((c as u16 + 2 * 255) / 3) as u8)
}

/// The lines of one arm's curve over seeds: the lowest and the highest seed (lighter), then
/// the mean.
fn seed_band(arm: &str, colour: [u8; 3], seeds: usize, curve: &[(u64, Vec<f64>)]) -> [Series; 3] {
    let light = lighter(colour);
    let pick = |f: fn(&[f64]) -> f64| curve.iter().map(|(s, v)| (*s as f64, f(v))).collect::<Vec<_>>();
    [
        Series {
            label: format!("{arm} (lowest seed)"),
            colour: light,
            points: pick(|v| v.iter().copied().fold(f64::INFINITY, f64::min)),
        },
        Series {
            label: format!("{arm} (highest seed)"),
            colour: light,
            points: pick(|v| v.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
        },
        Series { label: format!("{arm} (mean of {seeds} seeds)"), colour, points: pick(|v| mean_std(v).0) },
    ]
}

/// IoU against step: per arm the mean over seeds and, lighter, the lowest and highest seed
/// (the band); thresholds dashed (the first).
fn band_plot(order: &[String], results: &Results, thresholds: &[f32]) -> Result<image::RgbImage> {
    let mut series = Vec::new();
    for arm in order {
        let Some(runs) = results.get(arm) else { continue };
        let curve = curve_steps(runs);
        series.extend(seed_band(arm, colour_of(order, arm), runs.len(), &curve));
    }
    let panel = Panel {
        title: format!(
            "controllability iou: mean and range over seeds (dashed: {:.2})",
            thresholds.iter().copied().fold(0.0f32, f32::max)
        ),
        series,
        y_range: Some((0.0, 1.0)),
        reference: thresholds.iter().copied().reduce(f32::max).map(f64::from),
        log_y: false,
        ..Panel::default()
    };
    line_chart(&[panel], 860, 420)
}

/// The probe's held-out R² (mean over centre x, centre y, radius) against step: per arm the
/// mean over seeds and, lighter, the lowest and highest seed. None when no run logged it.
fn probe_panel(order: &[String], results: &Results) -> Option<Panel> {
    let mut series = Vec::new();
    for arm in order {
        let Some(runs) = results.get(arm) else { continue };
        let curve = probe_curve(runs);
        if curve.is_empty() {
            continue;
        }
        series.extend(seed_band(arm, colour_of(order, arm), runs.len(), &curve));
    }
    (!series.is_empty()).then(|| Panel {
        title: "linear probe, side feature → circle centre and radius: held-out R² (mean of the three)".into(),
        series,
        y_range: None,
        reference: None,
        log_y: false,
        ..Panel::default()
    })
}

/// The shares of τ at the last validation against the timestep bucket's centre (t/T): per
/// arm the control residuals' (mean over seeds) and, lighter, the LISA decoder's. None when no
/// run logged them.
fn tau_share_panel(order: &[String], results: &Results) -> Option<Panel> {
    let mut series = Vec::new();
    for arm in order {
        let Some(runs) = results.get(arm) else { continue };
        let shares = final_tau_shares(runs);
        let n = shares["buckets"].as_u64().unwrap_or(0) as f64;
        let colour = colour_of(order, arm);
        let light = lighter(colour);
        for (key, label, colour) in [("control", "control residuals", colour), ("decoder", "LISA decoder", light)] {
            let points: Vec<(f64, f64)> = shares[key]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .filter_map(|(b, s)| s["mean"].as_f64().map(|m| ((b as f64 + 0.5) / n, m)))
                .collect();
            if !points.is_empty() {
                series.push(Series { label: format!("{arm}: {label}"), colour, points });
            }
        }
    }
    (!series.is_empty()).then(|| Panel {
        title: "share of τ explained at the last validation, by timestep t/T (mean over seeds)".into(),
        series,
        y_range: None,
        reference: Some(0.0),
        log_y: false,
        x_axis: XAxis { label: "timestep t/T (bucket centre)", decimals: 1 },
    })
}

/// Checks that `dir` is a study folder (it holds [`MARKER`]), or absent or empty, and with
/// `create` makes it one: a folder with other contents and no marker is refused, so nothing
/// the user made is touched.
fn claim(dir: &Path, create: bool) -> Result<()> {
    if dir.exists() {
        let entries: Vec<String> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK)
            .collect();
        if !entries.is_empty() && !entries.iter().any(|n| n == MARKER) {
            bail!("{} holds files lisa study did not write; choose another --output-dir", dir.display());
        }
    }
    if !create {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let marker = dir.join(MARKER);
    if !marker.is_file() {
        std::fs::write(&marker, "written by lisa study: runs resume and skip here\n")
            .with_context(|| format!("cannot write in {}", dir.display()))?;
    }
    // Not while another study works here (held only for this check).
    drop(RunDir::lock(dir)?);
    Ok(())
}
