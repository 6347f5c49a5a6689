//! `lisa compare RUN_A RUN_B`: two runs' control metric against step, side by side (a LISA
//! run and its baseline, say): the steps each took to reach thresholds, the speed-up, and a
//! chart of both curves and both diffusion losses. It reads only the runs' `metrics.jsonl`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::plot::{BASELINE_BLUE, LISA_ORANGE, Panel, Series, line_chart};

/// Flags of `lisa compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The first run's output folder (its metrics.jsonl).
    run_a: PathBuf,
    /// The second run's output folder.
    run_b: PathBuf,
    /// The metrics.jsonl column to compare (default: the first of circle_iou, control_f1 and
    /// iou, the toy's, that both runs have).
    #[arg(long)]
    metric: Option<String>,
    /// A value of the metric to count steps to (repeatable; default: 50 %, 75 % and 90 % of
    /// the best value either run reached).
    #[arg(long)]
    threshold: Vec<f64>,
    /// Where the chart goes (PNG; an existing file is kept unless --overwrite).
    #[arg(long, default_value = "compare.png")]
    plot: PathBuf,
    /// Replace an existing --plot file.
    #[arg(long)]
    overwrite: bool,
}

/// One run's metrics: `(step, value)` of each validation, and `(step, diffusion loss)`.
struct Curves {
    name: String,
    metric: Vec<(u64, f64)>,
    loss: Vec<(u64, f64)>,
}

/// The rows of `dir/metrics.jsonl`, each a JSON object with a `step`.
fn rows(dir: &Path) -> Result<Rows> {
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        match row {
            serde_json::Value::Object(map) if map.get("step").is_some_and(serde_json::Value::is_u64) => rows.push(map),
            _ => bail!("{} line {}: not a metrics row (an object with a step)", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// A run's metrics rows: the folder and what its `metrics.jsonl` holds.
type Rows = Vec<serde_json::Map<String, serde_json::Value>>;

impl Curves {
    /// The curves of `metric` and the diffusion loss in `rows`, read from the run at `dir`.
    fn of(dir: &Path, rows: &Rows, metric: &str) -> Result<Self> {
        let series = |column: &str| -> Vec<(u64, f64)> {
            let mut points: Vec<(u64, f64)> = rows
                .iter()
                .filter_map(|r| Some((r["step"].as_u64()?, r.get(column)?.as_f64().filter(|v| v.is_finite())?)))
                .collect();
            points.sort_by_key(|p| p.0);
            points.dedup_by_key(|p| p.0);
            points
        };
        let values = series(metric);
        if values.is_empty() {
            let mut columns: Vec<&str> = rows.iter().flat_map(|r| r.keys().map(String::as_str)).collect();
            columns.sort_unstable();
            columns.dedup();
            bail!(
                "{}/metrics.jsonl has no value of {metric:?} (its columns: {}); validate with a control metric, or name another with --metric",
                dir.display(),
                columns.join(", ")
            );
        }
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Curves { name, metric: values, loss: series("main_loss") })
    }

    /// The first validated step whose value reached `threshold`.
    fn steps_to(&self, threshold: f64) -> Option<u64> {
        self.metric.iter().find(|p| p.1 >= threshold).map(|p| p.0)
    }
}

/// Runs `lisa compare`.
pub fn run(a: CompareArgs) -> Result<()> {
    if a.plot.exists() && !a.overwrite {
        bail!("--plot {} exists; give --overwrite to replace it, or another --plot", a.plot.display());
    }
    let (rows_a, rows_b) = (rows(&a.run_a)?, rows(&a.run_b)?);
    let metric = match &a.metric {
        Some(m) => m.clone(),
        None => {
            let has = |rows: &Rows, column: &str| {
                rows.iter().any(|r| r.get(column).is_some_and(serde_json::Value::is_number))
            };
            ["circle_iou", "control_f1", "iou"]
                .into_iter()
                .find(|c| has(&rows_a, c) && has(&rows_b, c))
                .unwrap_or("control_f1")
                .to_string()
        }
    };
    let mut runs = [Curves::of(&a.run_a, &rows_a, &metric)?, Curves::of(&a.run_b, &rows_b, &metric)?];
    // Runs whose folders share a name (lisa/seed0, base/seed0) are named by their paths.
    if runs[0].name == runs[1].name {
        runs[0].name = a.run_a.display().to_string();
        runs[1].name = a.run_b.display().to_string();
    }
    let best = runs.iter().flat_map(|r| r.metric.iter().map(|p| p.1)).fold(f64::NEG_INFINITY, f64::max);
    let mut thresholds: Vec<f64> = match a.threshold.is_empty() {
        true if best > 0.0 => [0.5, 0.75, 0.9].iter().map(|f| f * best).collect(),
        true => Vec::new(),
        false => a.threshold.clone(),
    };
    thresholds.dedup();
    if let Some(bad) = thresholds.iter().find(|t| !t.is_finite()) {
        bail!("--threshold {bad}: a finite value of {metric}");
    }
    // What the runs were trained with, from their latest checkpoints: a fair comparison
    // differs in the compared setting alone.
    let settings = |dir: &Path| -> Option<serde_json::Value> {
        let (_, latest, _) = lisa_trainer::checkpoint::list_checkpoints(dir).into_iter().max_by_key(|c| c.0)?;
        let (_, config, _) = lisa_trainer::checkpoint::read_configs(&latest).ok()?;
        let mut value = serde_json::to_value(config).ok()?;
        // Where a run stops is no setting of its training.
        value.as_object_mut()?.remove("max_train_steps");
        Some(value)
    };
    match (settings(&a.run_a), settings(&a.run_b)) {
        (Some(x), Some(y)) => {
            let differ = lisa_trainer::differences::differences(&x, &y);
            match differ.is_empty() {
                true => println!("training settings: the same (from the runs' latest checkpoints)"),
                false => println!(
                    "training settings that differ ({} vs {}): {}",
                    runs[0].name,
                    runs[1].name,
                    differ.join("; ")
                ),
            }
        }
        _ => println!("training settings: not compared (a run has no readable checkpoint)"),
    }
    println!("{metric}, per validation step:");
    for r in &runs {
        let last = r.metric.last().expect("read checks a value");
        let top = r.metric.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        println!("  {}: {} validations, last {:.4} at step {}, best {top:.4}", r.name, r.metric.len(), last.1, last.0);
    }
    match thresholds.is_empty() {
        true => println!("no steps to count: neither run's {metric} rose above 0 (give --threshold)"),
        false => println!("steps to a threshold (first validation at or above it):"),
    }
    for t in &thresholds {
        let steps: Vec<Option<u64>> = runs.iter().map(|r| r.steps_to(*t)).collect();
        let said = |s: Option<u64>| s.map_or("not reached".to_string(), |s| format!("step {s}"));
        let speedup = match (steps[0], steps[1]) {
            (Some(x), Some(y)) if x > 0 => {
                format!("; {} took {:.2}× the steps of {}", runs[1].name, y as f64 / x as f64, runs[0].name)
            }
            _ => String::new(),
        };
        println!(
            "  {metric} ≥ {t:.4}: {} {}, {} {}{speedup}",
            runs[0].name,
            said(steps[0]),
            runs[1].name,
            said(steps[1])
        );
    }
    let colours = [LISA_ORANGE, BASELINE_BLUE];
    let series = |points: fn(&Curves) -> &Vec<(u64, f64)>| -> Vec<Series> {
        runs.iter()
            .zip(colours)
            .map(|(r, colour)| Series {
                label: r.name.clone(),
                colour,
                points: points(r).iter().map(|&(s, v)| (s as f64, v)).collect(),
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("{metric} at each validation"),
            series: series(|r| &r.metric),
            reference: thresholds.last().copied(),
            ..Panel::default()
        },
        Panel { title: "diffusion loss".into(), series: series(|r| &r.loss), log_y: true, ..Panel::default() },
    ];
    let chart = line_chart(&panels, 860, 320)?;
    crate::image::save_png(&chart, &a.plot)?;
    println!("chart: {}", a.plot.display());
    Ok(())
}
