//! Reading the runs back from their metrics, the statistics over seeds, `summary.json` and
//! the printed table.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

/// One finished run, as read back from its metrics.
#[derive(Debug, Clone)]
pub(super) struct RunResult {
    /// `(step, IoU, colour error)` of every validation.
    pub(super) validations: Vec<(u64, f32, f32)>,
    /// Mean LISA loss and main loss over the last tenth of the steps.
    pub(super) final_losses: (f64, f64),
    /// `1 − mean LISA distance / mean distance of a zero decoder` over the last tenth of the
    /// steps: the share of τ the decoder explains (NaN without LISA).
    pub(super) explained: f64,
    /// Training seconds per step (validation excluded).
    pub(super) seconds_per_step: f64,
    /// The shares of τ per timestep bucket at each validation that logged them:
    /// `(step, decoder shares (None without a decoder), control shares)`.
    pub(super) tau_shares: Vec<TauRow>,
    /// `(step, held-out R² of the linear probe per target: centre x, centre y, radius)`.
    pub(super) probe_r2: Vec<(u64, Vec<f64>)>,
}

/// `(step, decoder share per bucket (None without a decoder), control share per bucket)`.
pub(super) type TauRow = (u64, Vec<Option<f64>>, Vec<f64>);

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

/// A finished run's validations, losses and speed from its `metrics.jsonl` (the speed: the
/// training-step rate of its last row, i.e. of the run's last uninterrupted stretch).
pub(super) fn read_run(dir: &Path) -> Result<RunResult> {
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
pub(super) fn mean_std(v: &[f64]) -> (f64, f64) {
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

pub(super) type Results = BTreeMap<String, Vec<(u64, RunResult)>>;

/// Per arm, over seeds: final IoU and colour error, steps and seconds to each threshold, the
/// step time, and against the reference arm: the step-time ratio and the speed-up to reach
/// the reference's mean final IoU (reference steps / arm steps, means over seeds).
pub(super) fn summarise(
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
pub(super) fn final_tau_shares(runs: &[(u64, RunResult)]) -> serde_json::Value {
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
pub(super) fn probe_curve(runs: &[(u64, RunResult)]) -> Vec<(u64, Vec<f64>)> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (_, r) in runs {
        for (step, r2) in &r.probe_r2 {
            by_step.entry(*step).or_default().push(r2.iter().sum::<f64>() / r2.len().max(1) as f64);
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == runs.len()).collect()
}

/// The IoU of every seed at each validated step all seeds share.
pub(super) fn curve_steps(runs: &[(u64, RunResult)]) -> Vec<(u64, Vec<f64>)> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (_, r) in runs {
        for &(s, iou, _) in &r.validations {
            by_step.entry(s).or_default().push(iou as f64);
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == runs.len()).collect()
}

/// The printed summary: one line per arm.
pub(super) fn summary_table(order: &[String], summary: &serde_json::Value, thresholds: &[f32]) -> String {
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
