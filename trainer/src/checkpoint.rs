//! Checkpoints of training runs (control training and pretraining): weights as safetensors
//! (readable by Python's `safetensors` and PyTorch), the run's state as JSON beside them.
//!
//! A checkpoint is a directory:
//!
//! | file | content |
//! |---|---|
//! | `model.safetensors` | every trainable tensor (`side.*`, `lisa.*`; `main.*` when pretraining), f32 |
//! | `optimizer.safetensors` | AdamW moments: `<name>.exp_avg`, `<name>.exp_avg_sq` |
//! | `ema.safetensors` | EMA shadows (only with EMA) |
//! | `controlnet/` | the side network in its architecture's native format (a diffusers ControlNet folder; where it has one) |
//! | `controlnet_ema/` | its EMA weights in the same format (only with EMA) |
//! | `state.json` | format version, kind, run id, step, random-stream counter, data epoch and position, the dataset's length and fingerprint, the configs, and the SHA-256 of every other file |
//!
//! Writing: every file goes to `<dir>.partial` (each written atomically), `state.json` last,
//! then the folder is renamed into place; a crash never leaves a half-written checkpoint under
//! the real name. Nothing non-finite is ever written. Loading verifies every file's digest,
//! name, shape and dtype, the model and the dataset, stages everything and changes nothing on
//! error. A resume may change the learning rate and the number of steps; nothing else.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use lisa_core::backend::{Backend, DType};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::differences::{differences, listed};
use crate::error::Result;
use crate::model::ModelSpec;
use crate::pretrain::PretrainConfig;
use crate::run::{TrainState, TrainingRun};
use crate::train::TrainConfig;
use crate::weights::{
    bad_checkpoint as bad, digest, io, load_tensors, parse_safetensors, to_safetensors, write_atomic,
};

/// Version of the checkpoint layout written into `state.json` (1: no digests, no run id).
pub const FORMAT_VERSION: u32 = 2;

/// The settings of a kind of training run, as checkpoints hold them.
pub trait RunSettings: Serialize + DeserializeOwned + Clone + PartialEq {
    /// `"train"` or `"pretrain"`.
    const KIND: &'static str;
    /// `self` (a checkpoint's settings) with what a resume may change taken from `current`:
    /// the learning rate, the number of steps, and what computes the same training another
    /// way (gradient checkpointing).
    fn with_resumable_from(&self, current: &Self) -> Self;
}

/// Both kinds keep the run length and the optimizer settings in the same fields; `$same`
/// names the kind's settings that change how, not what, it computes.
macro_rules! run_settings {
    ($config:ty, $kind:literal $(, $same:ident)*) => {
        impl RunSettings for $config {
            const KIND: &'static str = $kind;
            fn with_resumable_from(&self, current: &Self) -> Self {
                let mut s = self.clone();
                s.max_train_steps = current.max_train_steps;
                s.optim.lr = current.optim.lr;
                $(s.$same = current.$same;)*
                s
            }
        }
    };
}

run_settings!(TrainConfig, "train", gradient_checkpointing);
run_settings!(PretrainConfig, "pretrain");

/// The data a run was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetId {
    /// Number of examples.
    pub len: usize,
    /// [`Dataset::fingerprint`].
    pub fingerprint: String,
}

impl DatasetId {
    /// The id of `data`.
    pub fn of(data: &dyn Dataset) -> Self {
        Self { len: data.len(), fingerprint: data.fingerprint() }
    }
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile<C> {
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// [`RunSettings::KIND`].
    #[serde(default = "train_kind")]
    pub kind: String,
    /// The run that wrote it (runs prune only their own checkpoints).
    #[serde(default)]
    pub run_id: String,
    /// Where the run is.
    pub state: TrainState,
    /// AdamW's step count.
    pub optimizer_step: u64,
    /// The run's settings.
    #[serde(alias = "train")]
    pub config: C,
    /// The model.
    pub model: ModelSpec,
    /// The training data.
    #[serde(default)]
    pub dataset: Option<DatasetId>,
    /// SHA-256 of every other file of the checkpoint.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// SHA-256 of the frozen weights the run trained against (the prior).
    #[serde(default)]
    pub frozen: Option<String>,
    /// SHA-256 of this file's own content written with this field empty.
    #[serde(default)]
    pub state_digest: String,
}

impl<C: RunSettings> StateFile<C> {
    /// The file's bytes, with its own digest filled in.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut s = self.clone();
        s.state_digest = String::new();
        let unsigned = serde_json::to_vec_pretty(&s).map_err(|e| crate::TrainError::Serialize(e.to_string()))?;
        s.state_digest = digest(&unsigned);
        serde_json::to_vec_pretty(&s).map_err(|e| crate::TrainError::Serialize(e.to_string()))
    }

    /// Whether the digest matches the content (format 2).
    fn intact(&self) -> bool {
        let mut s = self.clone();
        s.state_digest = String::new();
        serde_json::to_vec_pretty(&s).is_ok_and(|b| digest(&b) == self.state_digest)
    }
}

/// SHA-256 over the names and values of the frozen parameters of `store`.
fn frozen_digest<B: Backend>(store: &crate::params::ParamStore<B>) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (_, p) in store.iter().filter(|(_, p)| !p.trainable) {
        h.update(p.name.as_bytes());
        for v in B::to_vec(&p.value)? {
            h.update(v.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn train_kind() -> String {
    "train".into()
}

/// Writes a checkpoint directory of `run` trained on `data` (see the module docs); an older
/// checkpoint at `dir` is replaced only once the new one is complete.
///
/// With EMA, the EMA weights stand in the model while `controlnet_ema/` is written (the
/// trained ones are back before this returns, whatever it returns): hence `&mut`.
pub fn save_checkpoint<B: Backend, C: RunSettings>(
    run: &mut TrainingRun<B, C>,
    data: &dyn Dataset,
    dir: &Path,
) -> Result<()> {
    if let Some(other) = run_id_at(dir)
        && !other.is_empty()
        && other != run.run_id
    {
        return Err(bad(dir, format!("belongs to another run ({other}); refusing to replace it")));
    }
    let partial = PathBuf::from(format!("{}.partial", dir.display()));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    if let Err(e) = write_files(run, data, &partial) {
        let _ = fs::remove_dir_all(&partial);
        return Err(e);
    }
    let old = PathBuf::from(format!("{}.old", dir.display()));
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&partial, dir).map_err(io(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Tensors with the names they are saved under.
type NamedTensors<'a, B> = Vec<(String, &'a <B as lisa_core::backend::BackendTypes>::Tensor)>;

/// The files of a checkpoint of `run`, into `partial` (`state.json` last).
fn write_files<B: Backend, C: RunSettings>(
    run: &mut TrainingRun<B, C>,
    data: &dyn Dataset,
    partial: &Path,
) -> Result<()> {
    let mut digests = BTreeMap::new();
    // The side network in the architecture's native format too (a diffusers ControlNet
    // folder for sd), and its EMA weights, inside the same atomic directory, their files'
    // digests listed as well.
    for folder in [crate::model::NATIVE_SIDE_DIR, crate::model::EMA_SIDE_DIR] {
        let native = partial.join(folder);
        let export = |run: &mut TrainingRun<B, C>| run.model.export_side(&native);
        let exported = match folder {
            crate::model::NATIVE_SIDE_DIR => export(run)?,
            _ => run.with_ema_weights(export).transpose()?.unwrap_or(false),
        };
        if exported {
            for (name, bytes) in folder_files(&native)? {
                digests.insert(format!("{folder}/{name}"), digest(&bytes));
            }
        }
    }
    let store = run.model.store();
    let name = |id| store.get(id).name.clone();
    let mut files: Vec<(&str, NamedTensors<'_, B>)> = Vec::new();
    // Only trainable tensors (the frozen main model is its own file).
    files.push((
        "model.safetensors",
        store.iter().filter(|(_, p)| p.trainable).map(|(_, p)| (p.name.clone(), &p.value)).collect(),
    ));
    let mut moments = Vec::new();
    for (id, m, v) in &run.optimizer.adamw.moments {
        moments.push((format!("{}.exp_avg", name(*id)), m));
        moments.push((format!("{}.exp_avg_sq", name(*id)), v));
    }
    files.push(("optimizer.safetensors", moments));
    if let Some(ema) = &run.optimizer.ema {
        files.push(("ema.safetensors", ema.shadow.iter().map(|(id, t)| (name(*id), t)).collect()));
    }
    for (file, tensors) in files {
        let bytes = to_safetensors::<B>(&tensors, BTreeMap::new())?;
        write_atomic(&partial.join(file), &bytes)?;
        digests.insert(file.to_string(), digest(&bytes));
    }
    let state = StateFile {
        format_version: FORMAT_VERSION,
        kind: C::KIND.into(),
        run_id: run.run_id.clone(),
        state: run.run.state,
        optimizer_step: run.optimizer.adamw.step,
        config: run.config.clone(),
        model: run.model.spec(),
        dataset: Some(DatasetId::of(data)),
        files: digests,
        frozen: Some(frozen_digest(store)?),
        state_digest: String::new(),
    };
    write_atomic(&partial.join("state.json"), &state.to_bytes()?)?;
    Ok(())
}

/// The files directly in `dir` (no subfolders), by name, with their bytes.
fn folder_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_file() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.push((name, fs::read(&path).map_err(io(&path))?));
        }
    }
    files.sort();
    Ok(files)
}

/// Checks that every file `state.json` lists besides `read` (those already checked as they
/// were read) is present with its digest: the side network's native export in particular.
fn verify_others<C>(state: &StateFile<C>, dir: &Path, read: &[&str]) -> Result<()> {
    for (file, want) in state.files.iter().filter(|(f, _)| !read.contains(&f.as_str())) {
        let path = dir.join(file);
        let bytes = fs::read(&path).map_err(io(&path))?;
        if digest(&bytes) != *want {
            return Err(bad(&path, "its content does not match the digest in state.json (corrupted or edited)"));
        }
    }
    Ok(())
}

/// A checkpoint's `state.json`, checked for its version and kind.
pub fn read_state<C: RunSettings>(dir: &Path) -> Result<StateFile<C>> {
    if !dir.is_dir() {
        return Err(bad(dir, "no such checkpoint directory"));
    }
    let path = dir.join("state.json");
    let text = fs::read(&path).map_err(io(&path))?;
    let state: StateFile<C> =
        serde_json::from_slice(&text).map_err(|e| bad(&path, format!("not a valid state file ({e})")))?;
    if !(1..=FORMAT_VERSION).contains(&state.format_version) {
        return Err(bad(
            &path,
            format!("format version {} (this build reads 1 to {FORMAT_VERSION})", state.format_version),
        ));
    }
    let v2_fields = !state.files.is_empty() || !state.state_digest.is_empty() || !state.run_id.is_empty();
    if state.format_version == 1 && v2_fields {
        return Err(bad(&path, "it claims format 1 but holds format 2 fields (a damaged file)"));
    }
    if state.format_version >= 2 && !state.intact() {
        return Err(bad(&path, "its content does not match its digest (corrupted or edited)"));
    }
    if state.kind != C::KIND {
        return Err(bad(&path, format!("a {} checkpoint, not a {} one", state.kind, C::KIND)));
    }
    Ok(state)
}

/// Checks a checkpoint's `state.json` and the digest of its `file` (what inference reads).
pub fn verify_file<C: RunSettings>(dir: &Path, file: &str) -> Result<()> {
    let state = read_state::<C>(dir)?;
    read_verified(&state, dir, file).map(|_| ())
}

/// The model spec, settings and position a training checkpoint was written with.
pub fn read_configs(dir: &Path) -> Result<(ModelSpec, TrainConfig, TrainState)> {
    let s = read_state::<TrainConfig>(dir)?;
    Ok((s.model, s.config, s.state))
}

/// A checkpoint file's tensors, after its digest is checked against `state.json` (format 2).
fn read_verified<C>(
    state: &StateFile<C>,
    dir: &Path,
    file: &str,
) -> Result<BTreeMap<String, (lisa_core::Shape, Vec<f32>)>> {
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(io(&path))?;
    if state.format_version >= 2 {
        let want = state.files.get(file).ok_or_else(|| bad(&path, "not listed in state.json"))?;
        if *want != digest(&bytes) {
            return Err(bad(
                &path,
                "its content does not match the digest in state.json (corrupted or from another checkpoint)",
            ));
        }
    }
    Ok(parse_safetensors(&path, &bytes)?.tensors)
}

/// Restores `run` from a checkpoint written by [`save_checkpoint`]: weights, AdamW moments and
/// step, EMA, data position, random-stream counter and run id. The model, the settings (but the
/// learning rate and the step count) and the dataset must be the checkpoint's. On any error
/// `run` is left unchanged.
pub fn load_checkpoint<B: Backend, C: RunSettings>(
    run: &mut TrainingRun<B, C>,
    data: &dyn Dataset,
    dir: &Path,
) -> Result<()> {
    let state = read_state::<C>(dir)?;
    let state_path = dir.join("state.json");
    let taken = state.state.step.checked_sub(state.state.skipped_steps);
    if taken != Some(state.optimizer_step) {
        return Err(crate::weights::bad_checkpoint(
            &state_path,
            format!(
                "step {} with {} skipped steps does not match the optimizer's {} steps",
                state.state.step, state.state.skipped_steps, state.optimizer_step
            ),
        ));
    }
    let model_differs = differences(&state.model.identity(), &run.model.spec().identity());
    if !model_differs.is_empty() {
        return Err(bad(
            &state_path,
            format!(
                "the checkpoint was written for a different model (checkpoint vs now: {})",
                listed(&model_differs, 4)
            ),
        ));
    }
    let resumable = state.config.with_resumable_from(&run.config);
    if resumable != run.config {
        let json = |c: &C| serde_json::to_value(c).unwrap_or(serde_json::Value::Null);
        return Err(bad(
            &state_path,
            format!(
                "the checkpoint was written with other settings (checkpoint vs now: {}); a resume may change only the learning rate, the number of steps and gradient checkpointing",
                listed(&differences(&json(&resumable), &json(&run.config)), 4)
            ),
        ));
    }
    if let Some(frozen) = &state.frozen
        && *frozen != frozen_digest(run.model.store())?
    {
        return Err(bad(&state_path, "the checkpoint was trained against other frozen weights (another prior)"));
    }
    let here = DatasetId::of(data);
    if let Some(there) = &state.dataset
        && *there != here
    {
        return Err(bad(
            &state_path,
            format!(
                "the checkpoint was trained on other data ({}, {} examples), not this one ({}, {} examples)",
                there.fingerprint, there.len, here.fingerprint, here.len
            ),
        ));
    }
    if state.state.position >= here.len.max(1) {
        return Err(bad(
            &state_path,
            format!("data position {} is past the dataset's {} examples", state.state.position, here.len),
        ));
    }
    verify_others(&state, dir, &["model.safetensors", "optimizer.safetensors", "ema.safetensors"])?;
    // Stage everything on a copy, so that a bad file leaves the run untouched.
    let mut store = run.model.store().clone();
    let names: Vec<String> = store.iter().filter(|(_, p)| p.trainable).map(|(_, p)| p.name.clone()).collect();
    let model_file = read_verified(&state, dir, "model.safetensors")?;
    load_tensors(&mut store, &dir.join("model.safetensors"), model_file, |n| names.iter().any(|m| m == n), |_| false)?;
    let device = store.device().clone();
    let take = |file: &mut BTreeMap<String, (lisa_core::Shape, Vec<f32>)>,
                path: &Path,
                key: String,
                like: &B::Tensor|
     -> Result<B::Tensor> {
        let (s, v) = file.remove(&key).ok_or_else(|| bad(path, format!("missing tensor {key}")))?;
        if s != B::shape(like) {
            return Err(bad(path, format!("tensor {key} has shape {s}, expected {}", B::shape(like))));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(bad(path, format!("tensor {key} holds NaN or infinite values")));
        }
        Ok(B::from_slice(&v, &s, DType::F32, &device)?)
    };
    let opt_path = dir.join("optimizer.safetensors");
    let mut file = read_verified(&state, dir, "optimizer.safetensors")?;
    let mut moments = Vec::with_capacity(run.optimizer.adamw.moments.len());
    for (id, m, _) in &run.optimizer.adamw.moments {
        let name = &store.get(*id).name;
        let exp_avg = take(&mut file, &opt_path, format!("{name}.exp_avg"), m)?;
        let exp_avg_sq = take(&mut file, &opt_path, format!("{name}.exp_avg_sq"), m)?;
        moments.push((*id, exp_avg, exp_avg_sq));
    }
    if let Some(extra) = file.keys().next() {
        return Err(bad(&opt_path, format!("unexpected tensor {extra}")));
    }
    let ema = match &run.optimizer.ema {
        None => None,
        Some(e) => {
            let ema_path = dir.join("ema.safetensors");
            let mut file = read_verified(&state, dir, "ema.safetensors")?;
            let mut shadow = Vec::with_capacity(e.shadow.len());
            for (id, t) in &e.shadow {
                shadow.push((*id, take(&mut file, &ema_path, store.get(*id).name.clone(), t)?));
            }
            Some(shadow)
        }
    };
    *run.model.store_mut() = store;
    run.optimizer.adamw.moments = moments;
    run.optimizer.adamw.step = state.optimizer_step;
    if let (Some(e), Some(shadow)) = (&mut run.optimizer.ema, ema) {
        e.shadow = shadow;
    }
    run.run.state = state.state;
    if !state.run_id.is_empty() {
        run.run_id = state.run_id;
    }
    Ok(())
}

/// The run id and step in `dir/state.json` (None: no readable state file there; an empty id:
/// one written before runs had ids).
fn run_id_at(dir: &Path) -> Option<String> {
    identity_at(dir).map(|(id, _)| id)
}

/// `(run id, step)` from `dir/state.json`, when it can be read.
fn identity_at(dir: &Path) -> Option<(String, Option<u64>)> {
    let text = fs::read(dir.join("state.json")).ok()?;
    let m = serde_json::from_slice::<HashMap<String, serde_json::Value>>(&text).ok()?;
    let id = m.get("run_id").and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let step = m.get("state").and_then(|s| s.get("step")).and_then(|s| s.as_u64());
    Some((id, step))
}

/// The checkpoints `checkpoint-<n>` in `dir`, by step, with the run id each was written by
/// (`None` where `state.json` cannot be read). The step is the one `state.json` records (a
/// renamed folder is where its state says it is), the folder name's where there is none.
pub fn list_checkpoints(dir: &Path) -> Vec<(u64, PathBuf, Option<String>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let named: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            let path = e.path();
            path.is_dir().then(|| match identity_at(&path) {
                Some((id, step)) => (step.unwrap_or(named), path, Some(id).filter(|id| !id.is_empty())),
                None => (named, path, None),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out
}

#[cfg(test)]
mod tests {
    /// `state.json`'s digest covers its re-serialised content: every f64 must read back as
    /// written. This one (Flux's sampling shift `e^μ` at 4×4 tokens) did not with serde_json's
    /// default float parser.
    #[test]
    fn f64_values_read_back_exactly() {
        for x in [1.583_084_248_078_864_3_f64, 0.1 + 0.2, std::f64::consts::E, 1e-300, 123_456.789_012_345_68] {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
    }
}
