//! Training data: the interface the trainer reads, and the procedural "fill circles"
//! task (docs/method.md §6, after ControlNet's Fill50K).

use crate::error::Result;

/// One training example in model layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Target image `[c, r, r]`, values in [−1, 1].
    pub image: Vec<f32>,
    /// Condition image `[c_hint, r, r]`, values in [0, 1].
    pub hint: Vec<f32>,
    /// The prompt (`""`: none).
    pub prompt: String,
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
    /// What identifies the data, for checkpoints: resuming on other data is an error. The
    /// default names only the length; sets that can do better say what they are.
    fn fingerprint(&self) -> String {
        format!("{} examples", self.len())
    }
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

/// The palette id of a colour name (any case).
pub fn colour_id(name: &str) -> Option<usize> {
    PALETTE.iter().position(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// A prompt that is not `"<fill> circle with <background> background"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prompt {0:?} is not \"<colour> circle with <colour> background\" (or empty)")]
pub struct PromptFormatError(pub String);

/// The colour ids a fill-circles prompt names, `[fill, background]`, each `None` when the
/// colour is outside [`PALETTE`]; the empty prompt names none. Words are matched in any case
/// and with any spacing.
pub fn prompt_colours(prompt: &str) -> std::result::Result<Vec<Option<usize>>, PromptFormatError> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    if words.is_empty() {
        return Ok(Vec::new());
    }
    let is = |i: usize, w: &str| words.get(i).is_some_and(|x| x.eq_ignore_ascii_case(w));
    let last = words.len() - 1;
    match words.iter().position(|w| w.eq_ignore_ascii_case("circle")) {
        // fill words, "circle", "with", background words, "background"
        Some(c) if c >= 1 && is(c + 1, "with") && c + 2 < last && is(last, "background") => {
            Ok(vec![colour_id(&words[..c].join(" ")), colour_id(&words[c + 2..last].join(" "))])
        }
        _ => Err(PromptFormatError(prompt.to_string())),
    }
}

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

impl Circle {
    /// Whether the centre of pixel `(x, y)` lies in the disc (the target's fill and the
    /// metrics' reference mask).
    pub fn covers(&self, x: usize, y: usize) -> bool {
        self.distance(x, y) <= self.radius
    }

    /// Whether pixel `(x, y)` belongs to the outline: a ring about 1.5 px wide on the edge.
    pub fn outlines(&self, x: usize, y: usize) -> bool {
        (self.distance(x, y) - self.radius).abs() <= 0.75
    }

    /// The prompt of this circle, `"<fill> circle with <background> background"`.
    pub fn prompt(&self) -> String {
        format!("{} circle with {} background", PALETTE[self.fill].0, PALETTE[self.background].0)
    }

    fn distance(&self, x: usize, y: usize) -> f32 {
        ((x as f32 + 0.5 - self.cx).powi(2) + (y as f32 + 0.5 - self.cy).powi(2)).sqrt()
    }
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

    fn fingerprint(&self) -> String {
        format!("fill-circles seed {} resolution {} length {}", self.seed, self.resolution, self.len)
    }

    fn get(&self, i: usize) -> Result<Example> {
        let c = self.circle(i);
        let n = self.resolution;
        let mut image = vec![0.0f32; 3 * n * n];
        let mut hint = vec![0.0f32; n * n];
        let (fill, bg) = (PALETTE[c.fill].1, PALETTE[c.background].1);
        for y in 0..n {
            for x in 0..n {
                let colour = if c.covers(x, y) { fill } else { bg };
                for ch in 0..3 {
                    image[ch * n * n + y * n + x] = colour[ch] * 2.0 - 1.0;
                }
                if c.outlines(x, y) {
                    hint[y * n + x] = 1.0;
                }
            }
        }
        Ok(Example { image, hint, prompt: c.prompt() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_to_palette_ids_or_none() {
        assert_eq!(prompt_colours("red circle with blue background"), Ok(vec![Some(0), Some(2)]));
        assert_eq!(prompt_colours("  Red  CIRCLE with Blue background "), Ok(vec![Some(0), Some(2)]));
        assert_eq!(prompt_colours("pale golden rod circle with light sea green background"), Ok(vec![None, None]));
        assert_eq!(prompt_colours(""), Ok(vec![]));
        assert!(prompt_colours("a photo of a cat").is_err());
        assert!(prompt_colours("circle with blue background").is_err());
        assert!(prompt_colours("red circle with background").is_err());
    }

    #[test]
    fn every_generated_prompt_names_its_colours() {
        let set = FillCircles { resolution: 8, len: 50, seed: 3 };
        for i in 0..set.len {
            let c = set.circle(i);
            assert_eq!(prompt_colours(&c.prompt()), Ok(vec![Some(c.fill), Some(c.background)]));
        }
    }
}
