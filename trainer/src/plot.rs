//! Line charts as PNG without a plotting dependency: panels of (x, y) series with axes,
//! grid lines, tick labels and a legend drawn in a built-in 3×5 pixel font.

use crate::image::Rgb8;

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
    /// Plot `log10(y)` (losses).
    pub log_y: bool,
}

const SCALE: usize = 2;
const MARGIN_LEFT: usize = 70;
const MARGIN_RIGHT: usize = 16;
const MARGIN_TOP: usize = 28;
const MARGIN_BOTTOM: usize = 28;

/// Renders `panels` stacked vertically, each `width × panel_height` pixels, sharing the x
/// range of all their points.
pub fn line_chart(panels: &[Panel], width: usize, panel_height: usize) -> Rgb8 {
    let mut img = Rgb8::new(width, panel_height * panels.len().max(1));
    img.pixels.fill(255);
    let xs = panels.iter().flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)));
    let (x0, x1) = min_max(xs).unwrap_or((0.0, 1.0));
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut img, panel, i * panel_height, width, panel_height, (x0, x1));
    }
    img
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return None;
    }
    Some(if hi - lo < 1e-12 { (lo - 0.5, hi + 0.5) } else { (lo, hi) })
}

fn draw_panel(img: &mut Rgb8, p: &Panel, top: usize, width: usize, height: usize, (x0, x1): (f64, f64)) {
    let ty = |y: f64| if p.log_y { y.max(1e-12).log10() } else { y };
    let (y0, y1) = p.y_range.map(|(a, b)| (ty(a), ty(b))).unwrap_or_else(|| {
        min_max(p.series.iter().flat_map(|s| s.points.iter().map(|q| ty(q.1)))).unwrap_or((0.0, 1.0))
    });
    let (left, right) = (MARGIN_LEFT, width.saturating_sub(MARGIN_RIGHT));
    let (up, down) = (top + MARGIN_TOP, top + height.saturating_sub(MARGIN_BOTTOM));
    let px = |x: f64| left as f64 + (x - x0) / (x1 - x0) * (right - left) as f64;
    let py = |y: f64| down as f64 - (ty(y) - y0) / (y1 - y0) * (down - up) as f64;
    // Grid and y ticks: five levels.
    for k in 0..=4 {
        let v = y0 + (y1 - y0) * k as f64 / 4.0;
        let y = (down as f64 - (down - up) as f64 * k as f64 / 4.0).round() as usize;
        hline(img, left, right, y, [225, 225, 225], 1);
        let label = if p.log_y { format!("{:.1e}", 10f64.powf(v)) } else { format!("{v:.2}") };
        text(img, &label, 4, y.saturating_sub(5), [90, 90, 90]);
    }
    // x ticks: start, middle, end.
    for k in 0..=2 {
        let v = x0 + (x1 - x0) * k as f64 / 2.0;
        let x = px(v).round() as usize;
        let label = format!("{v:.0}");
        text(img, &label, x.saturating_sub(label.len() * 4 * SCALE / 2), down + 6, [90, 90, 90]);
    }
    hline(img, left, right, down, [60, 60, 60], 1);
    vline(img, left, up, down, [60, 60, 60]);
    text(img, &p.title, left, top + 6, [20, 20, 20]);
    if let Some(r) = p.reference {
        let y = py(r).round();
        if y >= up as f64 && y <= down as f64 {
            hline(img, left, right, y as usize, [150, 150, 150], 6);
        }
    }
    for s in &p.series {
        for w in s.points.windows(2) {
            let (a, b) = (w[0], w[1]);
            if [a.1, b.1].iter().all(|v| v.is_finite()) {
                line(img, (px(a.0), py(a.1)), (px(b.0), py(b.1)), s.colour, (up, down));
            }
        }
        if s.points.len() == 1 {
            let (x, y) = (px(s.points[0].0), py(s.points[0].1));
            line(img, (x - 1.0, y), (x + 1.0, y), s.colour, (up, down));
        }
    }
    // Legend, right-aligned at the top.
    let mut x = right;
    for s in p.series.iter().rev() {
        let w = (s.label.len() * 4 + 4) * SCALE + 10;
        x = x.saturating_sub(w + 10);
        fill(img, x, top + 7, 8, 8, s.colour);
        text(img, &s.label, x + 12, top + 6, [20, 20, 20]);
    }
}

fn put(img: &mut Rgb8, x: usize, y: usize, c: [u8; 3]) {
    if x < img.width && y < img.height {
        let i = 3 * (y * img.width + x);
        img.pixels[i..i + 3].copy_from_slice(&c);
    }
}

fn fill(img: &mut Rgb8, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
    for yy in y..y + h {
        for xx in x..x + w {
            put(img, xx, yy, c);
        }
    }
}

/// A horizontal line; `dash > 1` draws `dash` pixels on, `dash` off.
fn hline(img: &mut Rgb8, x0: usize, x1: usize, y: usize, c: [u8; 3], dash: usize) {
    for x in x0..=x1 {
        if dash <= 1 || (x / dash).is_multiple_of(2) {
            put(img, x, y, c);
        }
    }
}

fn vline(img: &mut Rgb8, x: usize, y0: usize, y1: usize, c: [u8; 3]) {
    for y in y0..=y1 {
        put(img, x, y, c);
    }
}

/// A 2-pixel-wide line, clipped to rows `[up, down]`.
fn line(img: &mut Rgb8, a: (f64, f64), b: (f64, f64), c: [u8; 3], (up, down): (usize, usize)) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if y < up as f64 - 0.5 || y > down as f64 + 0.5 || x < 0.0 {
            continue;
        }
        let (xi, yi) = (x.round() as usize, y.round() as usize);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            put(img, xi + dx, yi + dy, c);
        }
    }
}

/// Draws `s` (upper-cased; unknown characters as blanks) with its top-left at `(x, y)`.
pub fn text(img: &mut Rgb8, s: &str, x: usize, y: usize, c: [u8; 3]) {
    for (i, ch) in s.chars().enumerate() {
        let rows = glyph(ch.to_ascii_uppercase());
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits.as_bytes()[col] == b'#' {
                    fill(img, x + (i * 4 + col) * SCALE, y + r * SCALE, SCALE, SCALE, c);
                }
            }
        }
    }
}

fn glyph(c: char) -> [&'static str; 5] {
    match c {
        'A' => [".#.", "#.#", "###", "#.#", "#.#"],
        'B' => ["##.", "#.#", "##.", "#.#", "##."],
        'C' => [".##", "#..", "#..", "#..", ".##"],
        'D' => ["##.", "#.#", "#.#", "#.#", "##."],
        'E' => ["###", "#..", "##.", "#..", "###"],
        'F' => ["###", "#..", "##.", "#..", "#.."],
        'G' => [".##", "#..", "#.#", "#.#", ".##"],
        'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
        'I' => ["###", ".#.", ".#.", ".#.", "###"],
        'J' => ["..#", "..#", "..#", "#.#", ".#."],
        'K' => ["#.#", "#.#", "##.", "#.#", "#.#"],
        'L' => ["#..", "#..", "#..", "#..", "###"],
        'M' => ["#.#", "###", "###", "#.#", "#.#"],
        'N' => ["##.", "#.#", "#.#", "#.#", "#.#"],
        'O' => [".#.", "#.#", "#.#", "#.#", ".#."],
        'P' => ["##.", "#.#", "##.", "#..", "#.."],
        'Q' => [".#.", "#.#", "#.#", "##.", ".##"],
        'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
        'S' => [".##", "#..", ".#.", "..#", "##."],
        'T' => ["###", ".#.", ".#.", ".#.", ".#."],
        'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
        'V' => ["#.#", "#.#", "#.#", "#.#", ".#."],
        'W' => ["#.#", "#.#", "###", "###", "#.#"],
        'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
        'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
        'Z' => ["###", "..#", ".#.", "#..", "###"],
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["##.", "..#", ".#.", "#..", "###"],
        '3' => ["##.", "..#", ".#.", "..#", "##."],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "##.", "..#", "##."],
        '6' => [".##", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", ".#.", ".#.", ".#."],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "##."],
        '.' => ["...", "...", "...", "...", ".#."],
        ',' => ["...", "...", "...", ".#.", "#.."],
        '-' => ["...", "...", "###", "...", "..."],
        '+' => ["...", ".#.", "###", ".#.", "..."],
        ':' => ["...", ".#.", "...", ".#.", "..."],
        '/' => ["..#", "..#", ".#.", "#..", "#.."],
        '(' => [".#.", "#..", "#..", "#..", ".#."],
        ')' => [".#.", "..#", "..#", "..#", ".#."],
        '=' => ["...", "###", "...", "###", "..."],
        '%' => ["#.#", "..#", ".#.", "#..", "#.#"],
        '>' => ["#..", ".#.", "..#", ".#.", "#.."],
        '<' => ["..#", ".#.", "#..", ".#.", "..#"],
        _ => ["...", "...", "...", "...", "..."],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &Rgb8, c: [u8; 3]) -> usize {
        img.pixels.chunks(3).filter(|p| *p == c).count()
    }

    #[test]
    fn draws_each_series_in_its_colour_within_the_panel() {
        let red = [220, 30, 30];
        let blue = [30, 30, 220];
        let panel = Panel {
            title: "iou".into(),
            series: vec![
                Series { label: "a".into(), colour: red, points: vec![(0.0, 0.0), (10.0, 1.0)] },
                Series { label: "b".into(), colour: blue, points: vec![(0.0, 1.0), (10.0, 0.0)] },
            ],
            y_range: Some((0.0, 1.0)),
            reference: Some(0.7),
            log_y: false,
        };
        let img = line_chart(&[panel.clone(), Panel { log_y: true, ..panel }], 300, 200);
        assert_eq!((img.width, img.height), (300, 400));
        // Each line spans the plot width: at least one pixel per column, in both panels.
        let plot_width = 300 - MARGIN_LEFT - MARGIN_RIGHT;
        assert!(count(&img, red) > 2 * plot_width, "red line missing");
        assert!(count(&img, blue) > 2 * plot_width, "blue line missing");
        // The rising line starts at the bottom-left of the first panel's plot area.
        let bottom = 200 - MARGIN_BOTTOM;
        let at = |x: usize, y: usize| &img.pixels[3 * (y * 300 + x)..3 * (y * 300 + x) + 3];
        assert!((bottom - 2..=bottom + 1).any(|y| at(MARGIN_LEFT + 1, y) == red), "line not anchored at (0, 0)");
    }

    #[test]
    fn text_uses_the_font() {
        let mut img = Rgb8::new(40, 20);
        text(&mut img, "I", 0, 0, [1, 2, 3]);
        // 'I' has 3 + 1 + 1 + 1 + 3 = 9 lit cells of SCALE² pixels.
        assert_eq!(count(&img, [1, 2, 3]), 9 * SCALE * SCALE);
    }
}
