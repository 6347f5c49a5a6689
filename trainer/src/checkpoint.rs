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

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use lisa_core::backend::{Backend, DType};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::ModelSpec;
use crate::train::{TrainConfig, TrainState, Trainer};
use crate::weights::{bad, io, load_params, read_safetensors, save_params, to_safetensors, write_atomic};

/// Version of the checkpoint layout written into `state.json`.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    state: TrainState,
    optimizer_step: u64,
    train: TrainConfig,
    model: ModelSpec,
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
    let store = trainer.model.store();
    // Only trainable tensors go into model.safetensors (the frozen main model is saved once).
    save_params(store, &partial.join("model.safetensors"), |n| {
        store.find(n).is_some_and(|id| store.get(id).trainable)
    })?;
    let mut moments: Vec<(String, &B::Tensor)> = Vec::new();
    for (id, m, v) in &trainer.optimizer.adamw.moments {
        let name = &store.get(*id).name;
        moments.push((format!("{name}.exp_avg"), m));
        moments.push((format!("{name}.exp_avg_sq"), v));
    }
    write_atomic(&partial.join("optimizer.safetensors"), &to_safetensors::<B>(&moments, HashMap::new())?)?;
    if let Some(ema) = &trainer.optimizer.ema {
        let shadows: Vec<(String, &B::Tensor)> =
            ema.shadow.iter().map(|(id, t)| (store.get(*id).name.clone(), t)).collect();
        write_atomic(&partial.join("ema.safetensors"), &to_safetensors::<B>(&shadows, HashMap::new())?)?;
    }
    let state = StateFile {
        format_version: FORMAT_VERSION,
        state: trainer.run.state,
        optimizer_step: trainer.optimizer.adamw.step,
        train: trainer.config.clone(),
        model: trainer.model.spec(),
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
pub fn read_configs(dir: &Path) -> Result<(ModelSpec, TrainConfig, TrainState)> {
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
    if state.model != trainer.model.spec() {
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
    let mut store = trainer.model.store().clone();
    let names: Vec<String> = store.iter().filter(|(_, p)| p.trainable).map(|(_, p)| p.name.clone()).collect();
    let is_trainable = |n: &str| names.iter().any(|m| m == n);
    load_params(&mut store, &dir.join("model.safetensors"), is_trainable, |_| false)?;
    let opt_path = dir.join("optimizer.safetensors");
    let mut file = read_safetensors(&opt_path)?;
    let device = store.device().clone();
    let mut moments = Vec::with_capacity(trainer.optimizer.adamw.moments.len());
    for (id, m, _) in &trainer.optimizer.adamw.moments {
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
    let ema = match &trainer.optimizer.ema {
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
    *trainer.model.store_mut() = store;
    trainer.optimizer.adamw.moments = moments;
    trainer.optimizer.adamw.step = state.optimizer_step;
    if let (Some(e), Some(shadow)) = (&mut trainer.optimizer.ema, ema) {
        e.shadow = shadow;
    }
    trainer.run.state = state.state;
    Ok(())
}
