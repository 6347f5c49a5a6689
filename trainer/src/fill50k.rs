//! The Fill50K folder format of ControlNet's tutorial: `prompt.json` holds one JSON object
//! per line, `{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}`, with
//! paths relative to the folder; sources are outlines on black, targets the filled circles.
//! Images are resized to the model resolution when read (targets by area averaging,
//! outlines by max pooling, so a 1-px ring survives 512 → 32).
//!
//! Prompts are `"<fill> circle with <background> background"`. The model embeds colour
//! *ids* of [`PALETTE`]; a colour name outside the palette (real Fill50K uses ~140 CSS
//! names) maps to the null id, i.e. that half of the prompt is dropped, as in
//! classifier-free-guidance dropout. [`Fill50k::unknown_colours`] counts such prompts.

use std::path::{Path, PathBuf};

use crate::data::{Dataset, Example, NULL_ID, PALETTE};
use crate::error::{Result, TrainError};
use crate::image::{Resample, read_png};

/// One line of `prompt.json`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    source: PathBuf,
    target: PathBuf,
    prompt: [usize; 2],
}

/// A Fill50K-format folder, read lazily (one example per [`Dataset::get`]).
#[derive(Debug, Clone)]
pub struct Fill50k {
    entries: Vec<Entry>,
    resolution: usize,
    unknown: usize,
}

/// Colour id of a palette name, or the null id.
fn colour_id(name: &str) -> Option<usize> {
    PALETTE.iter().position(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// `[fill, background]` ids of a prompt; `None` where a colour is not in the palette.
fn prompt_ids(prompt: &str) -> Option<[Option<usize>; 2]> {
    let p = prompt.trim();
    let (fill, rest) = p.split_once(" circle with ")?;
    let background = rest.strip_suffix(" background")?;
    Some([colour_id(fill.trim()), colour_id(background.trim())])
}

impl Fill50k {
    /// Reads `root/prompt.json` and checks that every listed image exists (so a missing
    /// file is reported now, with its name, not hours into training).
    pub fn open(root: &Path, resolution: usize) -> Result<Self> {
        if !root.is_dir() {
            return Err(TrainError::Data { path: root.to_path_buf(), reason: "dataset folder not found".into() });
        }
        if resolution == 0 {
            return Err(TrainError::Config("dataset resolution must be > 0".into()));
        }
        let list = root.join("prompt.json");
        let text = std::fs::read_to_string(&list).map_err(|source| TrainError::Io { path: list.clone(), source })?;
        let mut entries = Vec::new();
        let mut unknown = 0;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let at = |reason: String| TrainError::Data {
                path: PathBuf::from(format!("{}:{}", list.display(), n + 1)),
                reason,
            };
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| at(format!("no string field {k:?}")))
            };
            let (source, target, prompt) = (root.join(field("source")?), root.join(field("target")?), field("prompt")?);
            for p in [&source, &target] {
                if !p.is_file() {
                    return Err(at(format!("{} does not exist", p.display())));
                }
            }
            let ids = prompt_ids(&prompt)
                .ok_or_else(|| at(format!("prompt {prompt:?} is not \"<colour> circle with <colour> background\"")))?;
            if ids.iter().any(Option::is_none) {
                unknown += 1;
            }
            entries.push(Entry { source, target, prompt: ids.map(|i| i.unwrap_or(NULL_ID)) });
        }
        if entries.is_empty() {
            return Err(TrainError::Data { path: list, reason: "no examples listed".into() });
        }
        Ok(Self { entries, resolution, unknown })
    }

    /// Prompts with a colour outside [`PALETTE`] (embedded as the null id).
    pub fn unknown_colours(&self) -> usize {
        self.unknown
    }
}

impl Dataset for Fill50k {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, i: usize) -> Result<Example> {
        let e = self.entries.get(i).ok_or_else(|| TrainError::Config(format!("example {i} out of range")))?;
        let image =
            read_png(&e.target, self.resolution, false, Resample::Area)?.into_iter().map(|v| 2.0 * v - 1.0).collect();
        let hint = read_png(&e.source, self.resolution, true, Resample::Max)?;
        Ok(Example { image, hint, prompt: e.prompt.to_vec() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_to_palette_ids_or_null() {
        assert_eq!(prompt_ids("red circle with blue background"), Some([Some(0), Some(2)]));
        assert_eq!(prompt_ids("pale golden rod circle with blue background"), Some([None, Some(2)]));
        assert_eq!(prompt_ids("a photo of a cat"), None);
    }
}
