//! `lisa study`: a grid of arms × seeds of control training on the toy task, resumable, with
//! one JSONL row per validation, a summary over seeds and a plot with seed bands.
//!
//! Each arm is the base run file with the arm's `set` table merged over it; each seed sets
//! `[train] seed`, which seeds the data order, timesteps, noise and the decoder's weights, so
//! every arm of one seed sees the same data, timesteps and noise. Runs live in
//! `<output-dir>/<arm>/seed-<seed>/`; a run with `done.json` is skipped, an interrupted one
//! resumes from its latest checkpoint, and a run whose settings changed since it started is
//! refused (it would mix two configurations).

mod plan;
mod plot;
mod run;
mod summary;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;

use self::plan::{PlannedRun, StudyFile, plan};
use self::plot::{band_plot, probe_panel, tau_share_panel};
use self::run::{DONE, run_one};
use self::summary::{RunResult, read_run, summarise, summary_table};
use crate::image::save_png;
use crate::plot::line_chart;
use crate::shipped;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::session::{LOCK, OutputDir};
use lisa_trainer::train::Mode;
use lisa_trainer::weights::write_atomic;

/// The marker of folders `lisa study` made.
const MARKER: &str = ".lisa-study";

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

/// Runs `lisa study`.
pub fn run<B: Backend>(a: StudyArgs, device: B::Device) -> Result<()> {
    let text =
        std::fs::read_to_string(&a.config).with_context(|| format!("cannot read study file {}", a.config.display()))?;
    let study: StudyFile = toml::from_str(&text).with_context(|| format!("study file {}", a.config.display()))?;
    let here = a.config.parent().unwrap_or(Path::new("."));
    let relative = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { here.join(p) };
    let base = match study.base.as_deref().map(relative) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the base run file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("base run file {}", path.display()))?
        }
        None => toml::from_str(shipped::DEMO_RUN_FILE).context(shipped::DEMO_RUN_FILE_ORIGIN)?,
    };
    // Everything is planned and checked before the output folder is touched; the shipped prior
    // (compiled into lisa) is read from a scratch folder for that, and goes into the study's
    // folder once the folder is claimed.
    let scratch = std::env::temp_dir().join(format!("lisa-study-{}", std::process::id()));
    let (main, label) = match study.main.as_deref().map(relative) {
        Some(path) => (path, None),
        None => (shipped::prior_in(&scratch)?, Some(shipped::prior_label())),
    };
    if !main.is_file() {
        bail!("study file {}: the prior {} does not exist", a.config.display(), main.display());
    }
    let plan = plan(&study, &base, &main, label.as_deref(), &a.config, &relative)
        .and_then(|plan| check_models::<B>(&plan, &device).map(|()| plan));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    let mut plan = plan?;
    let reference = match &study.reference {
        Some(r) if !study.arms.iter().any(|a| &a.name == r) => {
            bail!("study file {}: reference arm {r:?} is not one of the arms", a.config.display())
        }
        Some(r) => Some(r.clone()),
        None => study.arms.iter().find(|a| a.name == "baseline").map(|a| a.name.clone()),
    };

    claim(&a.output_dir, !a.dry_run)?;
    if label.is_some() && !a.dry_run {
        let shipped = shipped::prior_in(&a.output_dir)?;
        for run in plan.iter_mut().filter(|r| r.main == main) {
            run.main = shipped.clone();
        }
    }
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

/// Builds each arm's model and loads its prior, so that a prior that is another model than
/// its arm describes is refused before the first arm trains (one seed per arm: seeds do not
/// change the networks).
fn check_models<B: Backend>(plan: &[PlannedRun], device: &B::Device) -> Result<()> {
    let mut checked = std::collections::HashSet::new();
    for run in plan.iter().filter(|r| checked.insert(r.arm.clone())) {
        let parts = Parts::Dual { decoder: run.file.train.mode == Mode::Lisa };
        let mut model = registry::build::<B>(&run.file.model, parts, device.clone(), run.file.train.seed)
            .with_context(|| format!("arm {:?}", run.arm))?;
        model.load_main(&run.main).with_context(|| format!("arm {:?}: its prior {}", run.arm, run.main.display()))?;
    }
    Ok(())
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
    drop(OutputDir::lock(dir)?);
    Ok(())
}
