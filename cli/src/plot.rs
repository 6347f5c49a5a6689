//! The comparison chart of `lisa demo --compare`, drawn with `plotters` into an RGB buffer;
//! text uses the bundled DejaVu Sans (assets/fonts), so no system font is needed.

use std::sync::Once;

use anyhow::{Result, anyhow};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// The LISA arm's colour in every figure of the project.
pub const LISA_ORANGE: [u8; 3] = [230, 120, 20];
/// The baseline arm's colour in every figure of the project.
pub const BASELINE_BLUE: [u8; 3] = [40, 90, 200];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Line colour.
    pub colour: [u8; 3],
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title, its series, and an optional dashed reference line.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Text above the panel.
    pub title: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Fixed y range; fitted to the data when `None`.
    pub y_range: Option<(f64, f64)>,
    /// A dashed horizontal line (a threshold).
    pub reference: Option<f64>,
    /// A logarithmic y axis (losses).
    pub log_y: bool,
    /// The x axis' label and tick decimals (default: "step", whole numbers).
    pub x_axis: XAxis,
}

/// The x axis of a panel.
#[derive(Debug, Clone, Copy)]
pub struct XAxis {
    /// Text under the axis.
    pub label: &'static str,
    /// Decimals of the tick labels.
    pub decimals: usize,
}

impl Default for XAxis {
    fn default() -> Self {
        XAxis { label: "step", decimals: 0 }
    }
}

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_font("sans-serif", FontStyle::Normal, FONT).map_err(|_| ()));
    result.map_err(|()| anyhow!("the bundled plot font could not be loaded"))
}

/// Renders `panels` stacked vertically, each `width × panel_height` pixels, sharing the x
/// range of all their points.
pub fn line_chart(panels: &[Panel], width: u32, panel_height: u32) -> Result<RgbImage> {
    register()?;
    let height = panel_height * panels.len().max(1) as u32;
    let mut buf = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let xs = panels.iter().flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)));
        let x_range = min_max(xs).unwrap_or((0.0, 1.0));
        for (area, panel) in root.split_evenly((panels.len().max(1), 1)).iter().zip(panels) {
            draw_panel(area, panel, x_range).map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    RgbImage::from_raw(width, height, buf).ok_or_else(|| anyhow!("plot buffer has the wrong size"))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area<'_>, p: &Panel, (x0, x1): (f64, f64)) -> Result<(), Box<dyn std::error::Error>> {
    // A log axis is drawn as a linear axis over log10(y), labelled with 10^v: plotters' own
    // log axis labels only whole decades, and a loss curve often spans less than one.
    let to_axis = |y: f64| if p.log_y { y.log10() } else { y };
    let ys = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)).filter(|v| !p.log_y || *v > 0.0);
    let (y0, y1) = p.y_range.or_else(|| min_max(ys.map(to_axis))).unwrap_or((0.0, 1.0));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 15))
        .margin_top(8)
        .margin_left(8)
        .margin_right(24)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let y_label = |v: &f64| if p.log_y { format!("{:.3}", 10f64.powf(*v)) } else { format!("{v:.2}") };
    chart
        .configure_mesh()
        .x_desc(p.x_axis.label)
        .x_label_formatter(&|v| format!("{v:.*}", p.x_axis.decimals))
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", 12))
        .draw()?;
    if let Some(r) = p.reference {
        let r = to_axis(r);
        let dashes: Vec<f64> = (0..=40).map(|i| x0 + (x1 - x0) * i as f64 / 40.0).collect();
        for pair in dashes.chunks_exact(2) {
            chart.draw_series(LineSeries::new([(pair[0], r), (pair[1], r)], BLACK.mix(0.6)))?;
        }
    }
    for s in &p.series {
        let colour = RGBColor(s.colour[0], s.colour[1], s.colour[2]);
        let points = s.points.iter().filter(|q| !p.log_y || q.1 > 0.0).map(|&(x, y)| (x, to_axis(y)));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    Some(if hi - lo < 1e-12 { (lo - 0.5, hi + 0.5) } else { (lo, hi) })
}
