//! Checkpoints: weights as safetensors (readable by Python's `safetensors` and PyTorch),
//! training state as JSON beside them; every file written to a temporary name, synced and
//! renamed, so a crash never leaves a half-written checkpoint under the real name.
//!
//! A training checkpoint is a directory:
//!
//! | file | content |
//! |---|---|
//! | `model.safetensors` | every trainable tensor (`side.*`, `lisa.*`), f32, names as in the store |
//! | `optimizer.safetensors` | AdamW moments: `<name>.exp_avg`, `<name>.exp_avg_sq` |
//! | `ema.safetensors` | EMA shadows of `side.*` (only with EMA) |
//! | `state.json` | format version, step, random-stream counter, data epoch/position, configs |
//!
//! Tensor names follow the module tree: `side.encoder.down.1.res.conv1.weight`,
//! `side.zero_convs.0.weight`, `lisa.stages.0.weight`, `main.up.2.res.norm1.bias`, …
//! Loading validates every name, shape and dtype and reports the first mismatch.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use lisa_core::backend::{Backend, DType, Shape};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::model::ModelConfig;
use crate::params::ParamStore;
use crate::train::{TrainConfig, TrainState, Trainer};

/// Version of the checkpoint layout written into `state.json`.
pub const FORMAT_VERSION: u32 = 1;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Serialises named f32 tensors to safetensors bytes (with string metadata).
pub fn to_safetensors<B: Backend>(
    tensors: &[(String, &B::Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let host: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: Vec<u8> = B::to_vec(t)?.iter().flat_map(|v| v.to_le_bytes()).collect();
            Ok((name.clone(), B::shape(t).dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = host
        .iter()
        .map(|(n, s, b)| {
            Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| TrainError::Config(e.to_string()))?))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| TrainError::Config(format!("safetensors: {e}")))
}

/// A safetensors file read into host memory: `name → (shape, f32 values)`.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, (Shape, Vec<f32>)>> {
    let bytes = fs::read(path).map_err(io(path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, format!("not a valid safetensors file ({e})")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(path, format!("tensor {name} has dtype {:?}, expected F32", view.dtype())));
        }
        let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.insert(name, (Shape::new(view.shape()), values));
    }
    Ok(out)
}

/// Loads every parameter selected by `select` from a safetensors file: the file must hold
/// exactly those names (with `rename` applied), with equal shapes; otherwise nothing is
/// changed and the first mismatch is reported.
pub fn load_params<B: Backend>(
    store: &mut ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    rename: impl Fn(&str) -> String,
) -> Result<usize> {
    load_params_ignoring(store, path, select, rename, |_| false)
}

/// [`load_params`], skipping file tensors for which `ignore(name)` holds (e.g. the LISA
/// decoder's `lisa.*` tensors when loading a training checkpoint for inference).
pub fn load_params_ignoring<B: Backend>(
    store: &mut ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    rename: impl Fn(&str) -> String,
    ignore: impl Fn(&str) -> bool,
) -> Result<usize> {
    let mut file = read_safetensors(path)?;
    file.retain(|name, _| !ignore(name));
    let wanted: Vec<_> = store
        .iter()
        .filter(|(_, p)| select(&p.name))
        .map(|(id, p)| (id, rename(&p.name), B::shape(&p.value)))
        .collect();
    let mut staged = Vec::with_capacity(wanted.len());
    for (id, name, shape) in wanted {
        let (s, v) = file.remove(&name).ok_or_else(|| bad(path, format!("missing tensor {name}")))?;
        if s != shape {
            return Err(bad(path, format!("tensor {name} has shape {s}, the model expects {shape}")));
        }
        staged.push((id, s, v));
    }
    if let Some(extra) = file.keys().next() {
        return Err(bad(path, format!("unexpected tensor {extra} (not in this model)")));
    }
    let device = store.device().clone();
    let n = staged.len();
    for (id, s, v) in staged {
        store.get_mut(id).value = B::from_slice(&v, &s, DType::F32, &device)?;
    }
    Ok(n)
}

/// Saves the parameters selected by `select` to one safetensors file (atomically).
pub fn save_params<B: Backend>(
    store: &ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    rename: impl Fn(&str) -> String,
) -> Result<()> {
    let tensors: Vec<(String, &B::Tensor)> =
        store.iter().filter(|(_, p)| select(&p.name)).map(|(_, p)| (rename(&p.name), &p.value)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("producer".to_string(), "lisa".to_string())]);
    write_atomic(path, &to_safetensors::<B>(&tensors, meta)?)
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    state: TrainState,
    optimizer_step: u64,
    train: TrainConfig,
    model: ModelConfig,
}

/// Writes a training checkpoint directory (see the module docs). The directory is first
/// written as `<dir>.partial` and renamed into place; an older checkpoint at `dir` is
/// replaced only once the new one is complete.
pub fn save_checkpoint<B: Backend>(trainer: &Trainer<B>, dir: &Path) -> Result<()> {
    let partial = PathBuf::from(format!("{}.partial", dir.display()));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    let store = &trainer.model.store;
    // Only trainable tensors go into model.safetensors (the frozen main model is saved once).
    save_params(
        store,
        &partial.join("model.safetensors"),
        |n| store.find(n).is_some_and(|id| store.get(id).trainable),
        |n| n.to_string(),
    )?;
    let mut moments: Vec<(String, &B::Tensor)> = Vec::new();
    for (id, m, v) in &trainer.optim.moments {
        let name = &store.get(*id).name;
        moments.push((format!("{name}.exp_avg"), m));
        moments.push((format!("{name}.exp_avg_sq"), v));
    }
    write_atomic(&partial.join("optimizer.safetensors"), &to_safetensors::<B>(&moments, HashMap::new())?)?;
    if let Some(ema) = &trainer.ema {
        let shadows: Vec<(String, &B::Tensor)> =
            ema.shadow.iter().map(|(id, t)| (store.get(*id).name.clone(), t)).collect();
        write_atomic(&partial.join("ema.safetensors"), &to_safetensors::<B>(&shadows, HashMap::new())?)?;
    }
    let state = StateFile {
        format_version: FORMAT_VERSION,
        state: trainer.run.state,
        optimizer_step: trainer.optim.step,
        train: trainer.config.clone(),
        model: trainer.model.config.clone(),
    };
    let json = serde_json::to_vec_pretty(&state).map_err(|e| bad(dir, e.to_string()))?;
    write_atomic(&partial.join("state.json"), &json)?;
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

/// The model and training configurations a checkpoint directory was written with.
pub fn read_configs(dir: &Path) -> Result<(ModelConfig, TrainConfig, TrainState)> {
    let state_path = dir.join("state.json");
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let state: StateFile =
        serde_json::from_slice(&text).map_err(|e| bad(&state_path, format!("invalid state file ({e})")))?;
    Ok((state.model, state.train, state.state))
}

/// Restores a trainer from a checkpoint directory written by [`save_checkpoint`]: weights,
/// AdamW moments and step, EMA, data position and random-stream counter. The model and
/// training configurations must equal the checkpoint's. On any error the trainer is left
/// unchanged.
pub fn load_checkpoint<B: Backend>(trainer: &mut Trainer<B>, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(bad(dir, "no such checkpoint directory"));
    }
    let state_path = dir.join("state.json");
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let state: StateFile =
        serde_json::from_slice(&text).map_err(|e| bad(&state_path, format!("invalid state file ({e})")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(bad(
            &state_path,
            format!("format version {} (this build reads {FORMAT_VERSION})", state.format_version),
        ));
    }
    if state.model != trainer.model.config {
        return Err(bad(&state_path, "the checkpoint was written for a different model configuration"));
    }
    // Everything but the run length must match: resuming continues the same run.
    let same_run = TrainConfig { max_train_steps: trainer.config.max_train_steps, ..state.train.clone() };
    if same_run != trainer.config {
        return Err(bad(
            &state_path,
            "the checkpoint was written with a different training configuration (seed, batch, optimizer, noise or LISA settings)",
        ));
    }
    // Stage everything on a copy, so that a bad file leaves the trainer untouched.
    let mut store = trainer.model.store.clone();
    let names: Vec<String> = store.iter().filter(|(_, p)| p.trainable).map(|(_, p)| p.name.clone()).collect();
    let is_trainable = |n: &str| names.iter().any(|m| m == n);
    load_params(&mut store, &dir.join("model.safetensors"), is_trainable, |n| n.to_string())?;
    let opt_path = dir.join("optimizer.safetensors");
    let mut file = read_safetensors(&opt_path)?;
    let device = store.device().clone();
    let mut moments = Vec::with_capacity(trainer.optim.moments.len());
    for (id, m, _) in &trainer.optim.moments {
        let name = &store.get(*id).name;
        let shape = B::shape(m);
        let mut take = |suffix: &str| -> Result<B::Tensor> {
            let key = format!("{name}.{suffix}");
            let (s, v) = file.remove(&key).ok_or_else(|| bad(&opt_path, format!("missing tensor {key}")))?;
            if s != shape {
                return Err(bad(&opt_path, format!("tensor {key} has shape {s}, expected {shape}")));
            }
            Ok(B::from_slice(&v, &s, DType::F32, &device)?)
        };
        moments.push((*id, take("exp_avg")?, take("exp_avg_sq")?));
    }
    if let Some(extra) = file.keys().next() {
        return Err(bad(&opt_path, format!("unexpected tensor {extra}")));
    }
    let ema = match &trainer.ema {
        None => None,
        Some(e) => {
            let ema_path = dir.join("ema.safetensors");
            let mut file = read_safetensors(&ema_path)?;
            let mut shadow = Vec::with_capacity(e.shadow.len());
            for (id, t) in &e.shadow {
                let name = &store.get(*id).name;
                let (s, v) = file.remove(name).ok_or_else(|| bad(&ema_path, format!("missing tensor {name}")))?;
                if s != B::shape(t) {
                    return Err(bad(&ema_path, format!("tensor {name} has shape {s}")));
                }
                shadow.push((*id, B::from_slice(&v, &s, DType::F32, &device)?));
            }
            Some(shadow)
        }
    };
    trainer.model.store = store;
    trainer.optim.moments = moments;
    trainer.optim.step = state.optimizer_step;
    if let (Some(e), Some(shadow)) = (&mut trainer.ema, ema) {
        e.shadow = shadow;
    }
    trainer.run.state = state.state;
    Ok(())
}
