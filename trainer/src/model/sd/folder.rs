//! diffusers model folders: `config.json` plus `diffusion_pytorch_model.safetensors` (or its
//! sharded `.index.json`), weights in f32, f16 or bf16 (held as f32).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use lisa_core::backend::{Backend, Shape};
use serde_json::{Map, Value};

use crate::error::{Result, TrainError};
use crate::params::ParamStore;
use crate::weights::{bad, io, parse_safetensors, to_safetensors, write_atomic};

/// The weights file of a diffusers model folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The index of a sharded weights file.
pub const WEIGHTS_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The model's configuration.
pub const CONFIG_FILE: &str = "config.json";

/// Host tensors by name.
pub type HostTensors = BTreeMap<String, (Shape, Vec<f32>)>;

/// The weights file of a transformers model folder.
pub const TRANSFORMERS_WEIGHTS_FILE: &str = "model.safetensors";
/// Its sharded index.
pub const TRANSFORMERS_WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The tensors of a diffusers folder (or of one safetensors file), and the path errors
/// should name. A sharded index must list every tensor of its shards exactly once.
pub fn read_diffusers_weights(path: &Path) -> Result<(PathBuf, HostTensors)> {
    read_weights_folder(path, WEIGHTS_FILE, WEIGHTS_INDEX)
}

/// The same for a transformers folder (`model.safetensors` or its sharded index).
pub fn read_transformers_weights(path: &Path) -> Result<(PathBuf, HostTensors)> {
    read_weights_folder(path, TRANSFORMERS_WEIGHTS_FILE, TRANSFORMERS_WEIGHTS_INDEX)
}

/// The tensors of one safetensors file, or of a folder's file `single` or sharded `index`.
fn read_weights_folder(path: &Path, single: &str, index: &str) -> Result<(PathBuf, HostTensors)> {
    let (weights_file, weights_index) = (single, index);
    if path.is_file() {
        return Ok((path.to_path_buf(), read_file(path)?));
    }
    if !path.is_dir() {
        return Err(bad(path, "no such model folder or weights file"));
    }
    let single = path.join(weights_file);
    if single.is_file() {
        return Ok((single.clone(), read_file(&single)?));
    }
    let index = path.join(weights_index);
    if !index.is_file() {
        return Err(bad(path, format!("holds neither {weights_file} nor {weights_index}")));
    }
    let text = fs::read_to_string(&index).map_err(io(&index))?;
    let parsed: Value = serde_json::from_str(&text).map_err(|e| bad(&index, format!("not JSON ({e})")))?;
    let map =
        parsed.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad(&index, "has no weight_map object"))?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| bad(&index, format!("weight_map[{name}] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(bad(&index, format!("weight_map[{name}] = {file:?} is not a file of this folder")));
        }
        shards.entry(file.to_string()).or_default().push(name.clone());
    }
    let mut all = HostTensors::new();
    for (file, names) in shards {
        let shard = path.join(&file);
        let mut tensors = read_file(&shard)?;
        for name in names {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| bad(&shard, format!("lacks tensor {name} that {weights_index} lists")))?;
            all.insert(name, t);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(bad(&shard, format!("holds tensor {extra} that {weights_index} does not list")));
        }
    }
    Ok((index, all))
}

fn read_file(path: &Path) -> Result<HostTensors> {
    let bytes = fs::read(path).map_err(io(path))?;
    Ok(parse_safetensors(path, &bytes)?.tensors)
}

/// A folder's `config.json` as a JSON object.
pub fn read_json_config(dir: &Path) -> Result<Map<String, Value>> {
    let path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).map_err(io(&path))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad(&path, "is not a JSON object")),
        Err(e) => Err(bad(&path, format!("is not valid JSON ({e})"))),
    }
}

/// Writes the parameters under `prefix` (prefix removed) as a diffusers folder: `config`
/// as `config.json` and the weights as f32 `diffusion_pytorch_model.safetensors`, each
/// file replaced atomically.
pub fn save_controlnet<B: Backend>(store: &ParamStore<B>, prefix: &str, config: &Value, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, &B::Tensor)> =
        store.iter().filter_map(|(_, p)| p.name.strip_prefix(prefix).map(|n| (n.to_string(), &p.value))).collect();
    if tensors.is_empty() {
        return Err(TrainError::Config(format!("no parameters under {prefix} to save")));
    }
    write_diffusers_folder::<B>(&tensors, config, dir)
}

/// Writes `tensors` (named as diffusers names them) and `config` into the diffusers folder
/// `dir`: the weights, then `config.json`, each atomically.
pub fn write_diffusers_folder<B: Backend>(tensors: &[(String, &B::Tensor)], config: &Value, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|error| TrainError::Io { path: dir.to_path_buf(), error })?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = to_safetensors::<B>(tensors, metadata)?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let text = serde_json::to_string_pretty(config).map_err(|e| TrainError::Serialize(e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
