//! The comparison chart of `lisa demo --compare`, drawn with `plotters` into an RGB buffer;
//! text uses the bundled DejaVu Sans (assets/fonts), so no system font is needed.

use std::sync::Once;

use anyhow::{Result, anyhow};
use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

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
    let ys = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)).filter(|v| !p.log_y || *v > 0.0);
    let (y0, y1) = p.y_range.or_else(|| min_max(ys)).unwrap_or((0.0, 1.0));
    let mut builder = ChartBuilder::on(area);
    builder.caption(&p.title, ("sans-serif", 15)).margin(8).x_label_area_size(28).y_label_area_size(56);
    let style = |s: &Series| RGBColor(s.colour[0], s.colour[1], s.colour[2]);
    let reference = |x: f64, y: f64| (x, y);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc("step").label_style(("sans-serif", 12)).draw()?;
            if let Some(r) = p.reference {
                let dashes = (0..40).map(|i| x0 + (x1 - x0) * i as f64 / 40.0).collect::<Vec<_>>();
                for pair in dashes.chunks(2) {
                    if let [a, b] = pair {
                        chart.draw_series(LineSeries::new([reference(*a, r), reference(*b, r)], &BLACK.mix(0.6)))?;
                    }
                }
            }
            for s in &p.series {
                let colour = style(s);
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))?
                    .label(&s.label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 12))
                .draw()?;
        }};
    }
    if p.log_y {
        draw!(builder.build_cartesian_2d(x0..x1, (y0.max(1e-12)..y1.max(2e-12)).log_scale())?);
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, y0..y1)?);
    }
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
