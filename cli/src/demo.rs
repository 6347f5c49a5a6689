//! `lisa demo`: the project's main job. Loads the shipped prior, trains the side branch
//! with LISA (and, with `--compare`, the baseline with the same seeds, data and
//! validation), and writes grids, metrics, a comparison plot and a summary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use image::RgbImage;
use lisa_core::backend::Backend;
use lisa_trainer::session::{LOCK, OutputDir, Rollback, RunReport};
use lisa_trainer::train::Mode;

use crate::arm::{LoopOptions, Start, train_arm};
use crate::config::RunFile;
use crate::image::save_png;
use crate::plot::{BASELINE_BLUE, LISA_ORANGE, Panel, Series, line_chart};
use crate::run_dir::CheckpointArgs;
use crate::shipped;

/// Flags of `lisa demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Also train the baseline (no LISA) with the same seeds and data, and compare.
    #[arg(long)]
    compare: bool,
    /// Run file (default: the shipped assets/demo.toml, compiled into lisa).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pretrained prior (default: the shipped assets/prior.safetensors, compiled into lisa
    /// and written to OUTPUT_DIR/prior.safetensors).
    #[arg(long)]
    main: Option<PathBuf>,
    /// Where grids, metrics, the plot and the summary go (each arm in its own folder).
    #[arg(long, default_value = "runs/demo")]
    output_dir: PathBuf,
    /// Optimizer steps per arm (default: the run file's).
    #[arg(long)]
    max_train_steps: Option<u64>,
    /// Validate every N steps.
    #[arg(long, default_value_t = 60)]
    validation_steps: u64,
    /// The IoU whose first crossing is reported as "steps to threshold".
    #[arg(long, default_value_t = 0.7)]
    threshold: f32,
}

/// Runs `lisa demo`.
pub fn run<B: Backend>(a: DemoArgs, device: B::Device) -> Result<()> {
    for (what, p) in [("run file", &a.config), ("prior", &a.main)] {
        if let Some(p) = p
            && !p.is_file()
        {
            bail!("demo {what} {} not found", p.display());
        }
    }
    let mut file = match &a.config {
        Some(path) => RunFile::load(Some(path))?,
        None => RunFile::from_toml(shipped::DEMO_RUN_FILE, shipped::DEMO_RUN_FILE_ORIGIN)?,
    };
    // A prior the user gave is checked before anything of an earlier demo is replaced; the
    // shipped one is the demo's own output (written after the claim).
    if let Some(main) = &a.main {
        file.resolve_model(main)?;
    }
    // The shipped prior an earlier demo wrote here is replaced, unless it is this run's input.
    let (outputs, kept): (&[&str], &[&str]) = match a.main {
        Some(_) => (&["comparison.png", "summary.json"], &[shipped::PRIOR_FILE]),
        None => (&["comparison.png", "summary.json", shipped::PRIOR_FILE], &[]),
    };
    claim(&a.output_dir, outputs, kept, &["lisa", "baseline"])?;
    let main = match &a.main {
        Some(path) => path.clone(),
        None => {
            let shipped = shipped::prior_in(&a.output_dir)?;
            file.resolve_model(&shipped)?;
            shipped
        }
    };
    if let Some(s) = a.max_train_steps {
        file.train.max_train_steps = s;
    }
    let start = Instant::now();
    let mut arms: Vec<(&str, Mode)> = vec![("lisa", Mode::Lisa)];
    if a.compare {
        arms.push(("baseline", Mode::Baseline));
    }
    let mut reports = Vec::new();
    for (label, mode) in &arms {
        let dir = a.output_dir.join(label);
        claim(&dir, &["metrics.jsonl", "validation-*.png", "checkpoint-*"], &[], &[])?;
        let mut arm_file = file.clone();
        arm_file.train.mode = *mode;
        let options = LoopOptions {
            latent_validation: None,
            tensorboard: None,
            validation_samples: 1,
            control_metric: crate::control_score::ControlMetric::None,
            output_dir: &dir,
            validation_steps: a.validation_steps,
            validate_at_start: true,
            checkpoints: CheckpointArgs {
                checkpointing_steps: 0,
                checkpoints_total_limit: Some(1),
                resume_from_checkpoint: None,
                rollback: Rollback::MoveAside,
                overwrite: true,
            },
            label,
        };
        reports.push(train_arm::<B>(&arm_file, Start::Files { main: &main, side: None }, device.clone(), &options)?);
    }
    let labelled: Vec<(&str, &RunReport)> = arms.iter().map(|a| a.0).zip(&reports).collect();
    let plot = a.output_dir.join("comparison.png");
    save_png(&comparison_plot(&labelled, a.threshold)?, &plot)?;
    let summary = summarise(&labelled, a.threshold, start.elapsed().as_secs_f64(), B::name());
    let summary_path = a.output_dir.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    let mut text = format!("\ndemo on {} finished in {:.1} min\n", B::name(), start.elapsed().as_secs_f64() / 60.0);
    for (label, r) in &labelled {
        let reached = r.steps_to(a.threshold).map_or("not reached".to_string(), |s| format!("step {s}"));
        text += &format!(
            "  {label:9} final iou {:.4}   iou >= {:.2}: {reached:12}   {:.2} steps/s ({:.1} min training)\n",
            r.final_score().unwrap_or(f32::NAN),
            a.threshold,
            r.steps_per_second(),
            r.train_seconds / 60.0
        );
    }
    text += &format!("  grids, metrics.jsonl per arm, {} and {}\n", plot.display(), summary_path.display());
    std::io::stdout().lock().write_all(text.as_bytes()).context("cannot write to standard output")?;
    Ok(())
}

/// The marker of folders `lisa demo` made.
const MARKER: &str = ".lisa-demo";

/// Makes `dir` a demo folder, or checks that it is one: a folder the demo made (it holds
/// [`MARKER`]) with nothing but the demo's `outputs` (names, `*` patterns), which it then
/// removes, files it `kept` (left as they are), and its `subfolders` (claimed on their own). Anything else is refused, so the demo
/// never deletes what it did not create.
fn claim(dir: &Path, outputs: &[&str], kept: &[&str], subfolders: &[&str]) -> Result<()> {
    let output = |name: &str| {
        outputs.iter().any(|p| match p.split_once('*') {
            Some((pre, post)) => name.starts_with(pre) && name.ends_with(post),
            None => name == *p,
        })
    };
    if dir.exists() {
        // Not while another process works in it (held only for this check).
        drop(OutputDir::lock(dir)?);
        let entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // The lock file of an earlier run, and temporary files a killed write left, are the
        // demo's own too.
        let own = |n: &str| {
            n == MARKER || n == LOCK || (n.starts_with('.') && n.contains(".tmp-")) || output(n) || kept.contains(&n)
        };
        let foreign: Vec<_> = entries.iter().filter(|n| !own(n) && !subfolders.contains(&n.as_str())).collect();
        let made_by_demo = entries.iter().any(|n| n == MARKER);
        if !entries.is_empty() && (!made_by_demo || !foreign.is_empty()) {
            bail!(
                "{} holds files lisa demo did not write ({}); choose another --output-dir",
                dir.display(),
                foreign.first().map_or("no demo marker", |n| n.as_str())
            );
        }
        for name in entries.iter().filter(|n| output(n) || (n.starts_with('.') && n.contains(".tmp-"))) {
            let path = dir.join(name);
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("cannot remove the earlier demo output {}", path.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "written by lisa demo; it may replace its own outputs here\n")
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    Ok(())
}

/// LISA in orange, the baseline in blue, as everywhere in this project's figures.
fn colour(label: &str) -> [u8; 3] {
    if label == "lisa" { LISA_ORANGE } else { BASELINE_BLUE }
}

/// IoU against step (with the threshold dashed) above the training loss (log scale,
/// smoothed over 20 steps).
pub fn comparison_plot(arms: &[(&str, &RunReport)], threshold: f32) -> Result<RgbImage> {
    let iou = Panel {
        title: format!("controllability iou (dashed: {threshold:.2})"),
        series: arms
            .iter()
            .map(|(l, r)| Series {
                label: l.to_string(),
                colour: colour(l),
                points: r.validations.iter().map(|&(s, v)| (s as f64, v as f64)).collect(),
            })
            .collect(),
        y_range: Some((0.0, 1.0)),
        reference: Some(threshold as f64),
        log_y: false,
        ..Panel::default()
    };
    let loss = Panel {
        title: "diffusion loss (mean of 20 steps)".into(),
        series: arms
            .iter()
            .map(|(l, r)| Series {
                label: l.to_string(),
                colour: colour(l),
                points: r
                    .steps
                    .chunks(20)
                    .map(|c| {
                        (c[c.len() - 1].step as f64, c.iter().map(|s| s.main_loss as f64).sum::<f64>() / c.len() as f64)
                    })
                    .collect(),
            })
            .collect(),
        y_range: None,
        reference: None,
        log_y: true,
        ..Panel::default()
    };
    line_chart(&[iou, loss], 720, 300)
}

fn summarise(arms: &[(&str, &RunReport)], threshold: f32, seconds: f64, backend: &str) -> serde_json::Value {
    let per_arm: serde_json::Map<String, serde_json::Value> = arms
        .iter()
        .map(|(l, r)| {
            (
                l.to_string(),
                serde_json::json!({
                    "final_iou": r.final_score(),
                    "steps_to_threshold": r.steps_to(threshold),
                    "validations": r.validations,
                    "train_seconds": r.train_seconds,
                    "wall_seconds": r.wall_seconds,
                    "steps": r.steps.len(),
                }),
            )
        })
        .collect();
    serde_json::json!({"backend": backend, "threshold": threshold, "wall_seconds": seconds, "arms": per_arm})
}
