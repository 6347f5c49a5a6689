//! Training data: the interface the trainer reads, and the procedural "fill circles"
//! task (lisa-method.md §6, after ControlNet's Fill50K).

use crate::error::Result;

/// One training example in model layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Target image `[c, r, r]`, values in [−1, 1].
    pub image: Vec<f32>,
    /// Condition image `[c_hint, r, r]`, values in [0, 1].
    pub hint: Vec<f32>,
    /// One id per prompt embedding.
    pub prompt: Vec<usize>,
}

/// A finite, indexable set of examples of one resolution.
pub trait Dataset {
    /// Number of examples.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `i` (`i < len`).
    fn get(&self, i: usize) -> Result<Example>;
}

/// The palette of the fill-circles task (RGB in [0, 1]); id 8 is the null prompt id.
pub const PALETTE: [(&str, [f32; 3]); 8] = [
    ("red", [0.9, 0.1, 0.1]),
    ("green", [0.1, 0.8, 0.2]),
    ("blue", [0.1, 0.2, 0.9]),
    ("yellow", [0.95, 0.9, 0.1]),
    ("cyan", [0.1, 0.85, 0.9]),
    ("magenta", [0.85, 0.1, 0.85]),
    ("white", [0.95, 0.95, 0.95]),
    ("black", [0.05, 0.05, 0.05]),
];

/// The null (unconditional) prompt id.
pub const NULL_ID: usize = PALETTE.len();

/// One fill-circles example's geometry and colours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Circle {
    /// Centre (pixels).
    pub cx: f32,
    /// Centre (pixels).
    pub cy: f32,
    /// Radius (pixels).
    pub radius: f32,
    /// Fill colour id.
    pub fill: usize,
    /// Background colour id (≠ fill).
    pub background: usize,
}

/// Procedural fill-circles: example `i` is a pure function of `(seed, i)`.
#[derive(Debug, Clone, PartialEq)]
pub struct FillCircles {
    /// Image side in pixels.
    pub resolution: usize,
    /// Number of examples.
    pub len: usize,
    /// Seed of the whole set.
    pub seed: u64,
}

impl FillCircles {
    /// The circle of example `i`.
    pub fn circle(&self, i: usize) -> Circle {
        let r = lisa_core::rng::philox4x32_10(
            [i as u32, (i >> 32) as u32, 0x00c1_7c1e, 0],
            [self.seed as u32, (self.seed >> 32) as u32],
        );
        let u = |k: usize| lisa_core::rng::uniform_open(r[k]);
        let res = self.resolution as f32;
        let radius = res * (0.15 + 0.2 * u(0));
        let margin = radius + 1.0;
        let cx = margin + (res - 2.0 * margin).max(0.0) * u(1);
        let cy = margin + (res - 2.0 * margin).max(0.0) * u(2);
        let fill = (r[3] % 8) as usize;
        let background = (fill + 1 + ((r[3] >> 8) % 7) as usize) % 8;
        Circle { cx, cy, radius, fill, background }
    }
}

impl Dataset for FillCircles {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Result<Example> {
        let c = self.circle(i);
        let n = self.resolution;
        let mut image = vec![0.0f32; 3 * n * n];
        let mut hint = vec![0.0f32; n * n];
        let (fill, bg) = (PALETTE[c.fill].1, PALETTE[c.background].1);
        for y in 0..n {
            for x in 0..n {
                let d = ((x as f32 + 0.5 - c.cx).powi(2) + (y as f32 + 0.5 - c.cy).powi(2)).sqrt();
                let colour = if d <= c.radius { fill } else { bg };
                for ch in 0..3 {
                    image[ch * n * n + y * n + x] = colour[ch] * 2.0 - 1.0;
                }
                // The outline: a ring about 1.5 px wide on the circle's edge.
                if (d - c.radius).abs() <= 0.75 {
                    hint[y * n + x] = 1.0;
                }
            }
        }
        Ok(Example { image, hint, prompt: vec![c.fill, c.background] })
    }
}
