//! The study's figures: the IoU band plot over seeds, the probe and τ-share panels, and the
//! arms' colours.

use anyhow::Result;

use super::summary::{Results, curve_steps, final_tau_shares, mean_std, probe_curve};
use crate::plot::{BASELINE_BLUE, LISA_ORANGE, Panel, Series, XAxis, line_chart};

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
pub(super) fn band_plot(order: &[String], results: &Results, thresholds: &[f32]) -> Result<image::RgbImage> {
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
pub(super) fn probe_panel(order: &[String], results: &Results) -> Option<Panel> {
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
pub(super) fn tau_share_panel(order: &[String], results: &Results) -> Option<Panel> {
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
