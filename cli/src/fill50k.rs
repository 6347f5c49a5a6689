//! The Fill50K folder format of ControlNet's tutorial: `prompt.json` holds one JSON object
//! per line, `{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}`, with
//! paths relative to the folder; sources are the condition images (outlines on black),
//! targets the images to generate. Images are resized to the model resolution when read
//! (targets smoothly, outlines by max pooling, so a 1-px ring survives 512 → 16).
//!
//! A latent-space model (sd) trains on precomputed latents instead of the target images:
//! `latents.safetensors` in the folder holds one tensor per example, named by its `target`
//! field, already scaled by the VAE's `scaling_factor`. A model whose side network reads the
//! VAE-encoded condition (sd3) reads its conditions from `condition_latents.safetensors`,
//! named by the `source` field, the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lisa_trainer::TrainError;
use lisa_trainer::data::{Dataset, Example};
use lisa_trainer::tensor_file::TensorFile;

use crate::image::{Resample, read_image};

/// One line of `prompt.json`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    source: PathBuf,
    target: PathBuf,
    /// The `target` field as written (the latent's name).
    target_name: String,
    /// The `source` field as written (the condition latent's name).
    source_name: String,
    prompt: String,
    line: usize,
}

/// What the model reads of each example.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// `[channels, side, side]` of the training image or latent.
    pub image: [usize; 3],
    /// `[channels, side, side]` of the condition image (1 channel: grey, max-pooled; 3: RGB,
    /// smooth).
    pub hint: [usize; 3],
    /// Targets come from this latents file (latent-space models), not from the PNGs.
    pub latents: Option<PathBuf>,
    /// Conditions come from this latents file (a side network that reads condition latents),
    /// not from the PNGs.
    pub hint_latents: Option<PathBuf>,
}

/// The name of the precomputed latents file in a dataset folder.
pub const LATENTS_FILE: &str = "latents.safetensors";
/// The name of the precomputed condition latents file in a dataset folder.
pub const CONDITION_LATENTS_FILE: &str = "condition_latents.safetensors";

/// A latents file holding a tensor for every entry, named by `name(entry)`, each `shape`;
/// errors name the entry's line of `prompt.json`. The values are read when an example needs
/// them (memory: one latent, whatever the dataset's size), and checked then (finite): the
/// training start reads every example once. Returns the file and its digest.
fn latent_table(
    path: &Path,
    list: &Path,
    entries: &[Entry],
    name: impl Fn(&Entry) -> &str,
    shape: [usize; 3],
) -> lisa_trainer::Result<(Arc<TensorFile>, String)> {
    let file = TensorFile::open(path)?;
    for e in entries {
        let at =
            |reason: String| TrainError::Data { path: PathBuf::from(format!("{}:{}", list.display(), e.line)), reason };
        let key = name(e);
        let s = file.shape(key).ok_or_else(|| at(format!("{} has no latent named {key:?}", path.display())))?;
        if s != shape {
            return Err(at(format!("the latent {key:?} in {} is {s:?}; the model reads {shape:?}", path.display())));
        }
    }
    let digest = file.digest()?;
    Ok((Arc::new(file), digest))
}

/// An example's latent from `table`, named `name`, finite.
fn latent(table: &TensorFile, name: &str, what: &str) -> lisa_trainer::Result<Vec<f32>> {
    let values = table.read(name)?.ok_or_else(|| TrainError::Mismatch(format!("no {what} for {name:?}")))?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::Data {
            path: table.path().to_path_buf(),
            reason: format!("the {what} {name:?} holds NaN or infinite values"),
        });
    }
    Ok(values)
}

/// A Fill50K-format folder, read lazily (one example per [`Dataset::get`], its latents too:
/// their names and shapes are checked when opened, their values when read).
#[derive(Debug, Clone)]
pub struct Fill50k {
    entries: Vec<Entry>,
    layout: Layout,
    /// Latents by `target` field.
    latents: Option<Arc<TensorFile>>,
    /// Condition latents by `source` field.
    hint_latents: Option<Arc<TensorFile>>,
    fingerprint: String,
    /// The SHA-256 of the target images' contents, in list order (None: read from latents).
    targets_digest: Option<String>,
}

/// The SHA-256 of the files' contents, in order (each file's own digest, then one of all).
fn contents_digest<'a>(files: impl Iterator<Item = &'a Path>) -> lisa_trainer::Result<String> {
    let mut parts = Vec::new();
    for path in files {
        let bytes =
            crate::image::read_bytes(path).map_err(|error| TrainError::Io { path: path.to_path_buf(), error })?;
        parts.push(lisa_trainer::weights::digest(&bytes));
    }
    Ok(lisa_trainer::weights::digest(parts.join(",").as_bytes()))
}

impl Fill50k {
    /// Reads `root/prompt.json` and checks that every listed image exists (so a missing
    /// file is reported now, with its name and line, not hours into training).
    pub fn open(root: &Path, layout: Layout) -> lisa_trainer::Result<Self> {
        if !root.is_dir() {
            return Err(TrainError::Data { path: root.to_path_buf(), reason: "dataset folder not found".into() });
        }
        let hint_channels_ok = layout.hint_latents.is_some() || [1, 3].contains(&layout.hint[0]);
        if layout.image.contains(&0) || layout.hint.contains(&0) || !hint_channels_ok {
            return Err(TrainError::Config(format!("dataset layout {layout:?} is not readable")));
        }
        let list = root.join("prompt.json");
        let text = std::fs::read_to_string(&list).map_err(|error| TrainError::Io { path: list.clone(), error })?;
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
            let (target_name, source_name) = (field("target")?, field("source")?);
            let (source, target, prompt) = (root.join(&source_name), root.join(&target_name), field("prompt")?);
            let mut needed: Vec<&PathBuf> = Vec::new();
            if layout.hint_latents.is_none() {
                needed.push(&source);
            }
            if layout.latents.is_none() {
                needed.push(&target);
            }
            for p in needed {
                if !crate::image::data_exists(p) {
                    return Err(at(format!("{} does not exist", p.display())));
                }
            }
            entries.push(Entry { source, source_name, target, target_name, prompt, line: n + 1 });
        }
        if entries.is_empty() {
            return Err(TrainError::Data { path: list, reason: "no examples listed".into() });
        }
        let digest = lisa_trainer::weights::digest(text.as_bytes());
        // The contents of the list and of every image read, not the folder's path: the same
        // data moved or named by a relative path is the same data, an edited image is not.
        let mut fingerprint = format!("fill50k prompt.json sha256 {digest}");
        let hint_latents = match &layout.hint_latents {
            Some(path) => {
                let (table, sha) = latent_table(path, &list, &entries, |e| &e.source_name, layout.hint)?;
                fingerprint.push_str(&format!(", {CONDITION_LATENTS_FILE} sha256 {sha}"));
                Some(table)
            }
            None => {
                let sources = contents_digest(entries.iter().map(|e| e.source.as_path()))?;
                fingerprint.push_str(&format!(", sources sha256 {sources}"));
                None
            }
        };
        let targets_digest = match layout.latents {
            Some(_) => None,
            None => Some(contents_digest(entries.iter().map(|e| e.target.as_path()))?),
        };
        if let Some(targets) = &targets_digest {
            fingerprint.push_str(&format!(", targets sha256 {targets}"));
        }
        let latents = match &layout.latents {
            Some(path) => {
                let (table, sha) = latent_table(path, &list, &entries, |e| &e.target_name, layout.image)?;
                fingerprint.push_str(&format!(", {LATENTS_FILE} sha256 {sha}"));
                Some(table)
            }
            None => None,
        };
        Ok(Self { entries, layout, latents, hint_latents, fingerprint, targets_digest })
    }

    /// The SHA-256 of the target images' contents (None when the targets come from latents).
    pub fn targets_digest(&self) -> Option<&str> {
        self.targets_digest.as_deref()
    }

    /// The line of `prompt.json` that lists example `i`.
    pub fn line(&self, i: usize) -> usize {
        self.entries.get(i).map_or(0, |e| e.line)
    }

    /// `(source field, source path, line)` of every example, in file order.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &Path, usize)> {
        self.entries.iter().map(|e| (e.source_name.as_str(), e.source.as_path(), e.line))
    }

    /// `(target field, target path, line)` of every example, in file order.
    pub fn targets(&self) -> impl Iterator<Item = (&str, &Path, usize)> {
        self.entries.iter().map(|e| (e.target_name.as_str(), e.target.as_path(), e.line))
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
        format!("{} at {:?} / {:?}", self.fingerprint, self.layout.image, self.layout.hint)
    }

    fn get(&self, i: usize) -> lisa_trainer::Result<Example> {
        let e = self.entries.get(i).ok_or_else(|| TrainError::Mismatch(format!("example {i} out of range")))?;
        let read = |path: &Path, side, grey, resample| {
            read_image(path, side, grey, resample)
                .map_err(|err| TrainError::Data { path: path.to_path_buf(), reason: format!("{err:#}") })
        };
        let image = match &self.latents {
            Some(table) => latent(table, &e.target_name, "latent")?,
            None => read(&e.target, self.layout.image[1], false, Resample::Smooth)?
                .into_iter()
                .map(|v| 2.0 * v - 1.0)
                .collect(),
        };
        // Grey outlines are max-pooled (a 1-px ring survives downscaling); RGB conditions
        // are resized and centre-cropped, as diffusers' training scripts do.
        let hint = match (&self.hint_latents, self.layout.hint[0]) {
            (Some(table), _) => latent(table, &e.source_name, "condition latent")?,
            (None, 1) => read(&e.source, self.layout.hint[1], true, Resample::Max)?,
            (None, _) => read(&e.source, self.layout.hint[1], false, Resample::CenterCrop)?,
        };
        Ok(Example { image, hint, prompt: e.prompt.clone() })
    }
}
