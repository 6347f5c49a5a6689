//! The Fill50K folder format of ControlNet's tutorial: `prompt.json` holds one JSON object
//! per line, `{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}`, with
//! paths relative to the folder; sources are the condition images (outlines on black),
//! targets the images to generate. Images are resized to the model resolution when read
//! (targets smoothly, outlines by max pooling, so a 1-px ring survives 512 → 16).

use std::path::{Path, PathBuf};

use lisa_trainer::TrainError;
use lisa_trainer::data::{Dataset, Example};

use crate::image::{Resample, read_image};

/// One line of `prompt.json`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    source: PathBuf,
    target: PathBuf,
    prompt: String,
    line: usize,
}

/// A Fill50K-format folder, read lazily (one example per [`Dataset::get`]).
#[derive(Debug, Clone)]
pub struct Fill50k {
    entries: Vec<Entry>,
    resolution: usize,
    fingerprint: String,
}

impl Fill50k {
    /// Reads `root/prompt.json` and checks that every listed image exists (so a missing
    /// file is reported now, with its name and line, not hours into training).
    pub fn open(root: &Path, resolution: usize) -> lisa_trainer::Result<Self> {
        if !root.is_dir() {
            return Err(TrainError::Data { path: root.to_path_buf(), reason: "dataset folder not found".into() });
        }
        if resolution == 0 {
            return Err(TrainError::Config("dataset resolution must be > 0".into()));
        }
        let list = root.join("prompt.json");
        let text = std::fs::read_to_string(&list).map_err(|source| TrainError::Io { path: list.clone(), source })?;
        // A UTF-8 byte-order mark (some editors write one) is not part of the first line.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let mut entries = Vec::new();
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
            entries.push(Entry { source, target, prompt, line: n + 1 });
        }
        if entries.is_empty() {
            return Err(TrainError::Data { path: list, reason: "no examples listed".into() });
        }
        let digest = lisa_trainer::weights::digest(text.as_bytes());
        // The list's content, not the folder's path: the same data moved or named by a relative
        // path is the same data.
        Ok(Self { entries, resolution, fingerprint: format!("fill50k prompt.json sha256 {digest}") })
    }

    /// The line of `prompt.json` that lists example `i`.
    pub fn line(&self, i: usize) -> usize {
        self.entries.get(i).map_or(0, |e| e.line)
    }

    /// Every prompt, in file order.
    pub fn prompts(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.prompt.as_str())
    }
}

impl Dataset for Fill50k {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn fingerprint(&self) -> String {
        format!("{} at {} px", self.fingerprint, self.resolution)
    }

    fn get(&self, i: usize) -> lisa_trainer::Result<Example> {
        let e = self.entries.get(i).ok_or_else(|| TrainError::Mismatch(format!("example {i} out of range")))?;
        let read = |path: &Path, grey, resample| {
            read_image(path, self.resolution, grey, resample)
                .map_err(|err| TrainError::Data { path: path.to_path_buf(), reason: format!("{err:#}") })
        };
        let image = read(&e.target, false, Resample::Smooth)?.into_iter().map(|v| 2.0 * v - 1.0).collect();
        let hint = read(&e.source, true, Resample::Max)?;
        Ok(Example { image, hint, prompt: e.prompt.clone() })
    }
}
