//! Weights on disk: named f32 tensors as safetensors (readable by Python's `safetensors`
//! and PyTorch), written atomically (temporary file, fsync, rename) and byte-identical for
//! identical content, never with a non-finite value, loaded only when every name and shape
//! matches.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use lisa_core::backend::{Backend, DType, Shape};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Result, TrainError};
use crate::params::ParamStore;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |error| TrainError::Io { path: path.to_path_buf(), error }
}

/// What is wrong with a file or folder (a model's, a pipeline's: [`TrainError::File`]).
pub(crate) fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::File { path: path.to_path_buf(), reason: reason.into() }
}

/// What is wrong with a checkpoint's file or folder ([`TrainError::Checkpoint`]).
pub(crate) fn bad_checkpoint(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync dir.
/// Errors name `path` (never the temporary file, which is removed on failure).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&tmp);
        return Err(TrainError::Io { path: path.to_path_buf(), error: source });
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The SHA-256 of `bytes`, lower-case hex (checkpoint files record theirs).
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises named f32 tensors to safetensors bytes (with string metadata). A tensor with a
/// NaN or infinite value is an error naming it: such weights are never written. The header's
/// keys are sorted, so identical tensors and metadata give identical bytes.
pub fn to_safetensors<B: Backend>(
    tensors: &[(String, &B::Tensor)],
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let host: Vec<(String, Shape, Vec<f32>)> =
        tensors.iter().map(|(name, t)| Ok((name.clone(), B::shape(t), B::to_vec(t)?))).collect::<Result<_>>()?;
    let views: Vec<(String, Shape, &[f32])> =
        host.iter().map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice())).collect();
    host_to_safetensors(&views, metadata)
}

/// Serialises host `f32` tensors `(name, shape, values)` to safetensors bytes, as
/// [`to_safetensors`] does for device tensors (finite values only, sorted header).
pub fn host_to_safetensors(tensors: &[(String, Shape, &[f32])], metadata: BTreeMap<String, String>) -> Result<Vec<u8>> {
    let host: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(TrainError::NonFiniteTensor { tensor: name.clone() });
            }
            if shape.num_elements()? != values.len() {
                return Err(TrainError::Serialize(format!("tensor {name}: {} values for {shape}", values.len())));
            }
            Ok((name.clone(), shape.dims().to_vec(), values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        })
        .collect::<Result<_>>()?;
    let views = host
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.as_str(),
                TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| TrainError::Serialize(e.to_string()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Serialize(format!("safetensors: {e}")))?;
    Ok(sorted_header(bytes))
}

/// The same file with its JSON header's keys in sorted order (same length: only the order of
/// the `__metadata__` entries, which come from a hash map, can differ).
fn sorted_header(mut bytes: Vec<u8>) -> Vec<u8> {
    let Some(len) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize) else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + len) else { return bytes };
    let Ok(mut top) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else { return bytes };
    if let Some(meta) = top.get_mut("__metadata__") {
        let Ok(sorted) = serde_json::from_value::<BTreeMap<String, String>>(meta.clone()) else { return bytes };
        *meta = serde_json::to_value(sorted).unwrap_or_default();
    }
    let Ok(sorted) = serde_json::to_vec(&top) else { return bytes };
    let trimmed = header.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
    if sorted.len() == trimmed {
        bytes[8..8 + trimmed].copy_from_slice(&sorted);
    }
    bytes
}

/// A safetensors file parsed from `bytes` read from `path`: `name → (shape, f32 values)` and
/// the string metadata.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<SafetensorsFile> {
    parse_safetensors_skipping(path, bytes, |_| false)
}

/// [`parse_safetensors`], leaving out the tensors `skip` names (integer buffers such as
/// transformers' `position_ids`, which are no weights).
pub fn parse_safetensors_skipping(path: &Path, bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<SafetensorsFile> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad(path, format!("not a valid safetensors file ({e})")))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(path, format!("not a valid safetensors file ({e})")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        if skip(&name) {
            continue;
        }
        // Stored as f32, f16 or bf16 (diffusers' half-precision checkpoints); held as f32.
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(bad(path, format!("tensor {name} has dtype {other:?}, expected F32, F16 or BF16")));
            }
        };
        tensors.insert(name, (Shape::new(view.shape()), values));
    }
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok(SafetensorsFile { tensors, metadata })
}

/// A safetensors file in host memory.
#[derive(Debug, Clone, Default)]
pub struct SafetensorsFile {
    /// `name → (shape, f32 values)`.
    pub tensors: BTreeMap<String, (Shape, Vec<f32>)>,
    /// The header's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
}

/// The metadata key under which lisa records the model a weights file belongs to (the
/// [`crate::model::ModelSpec`] as JSON).
pub const MODEL_SPEC_KEY: &str = "lisa.model_spec";

/// The `__metadata__` of a safetensors file, reading only its header.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let top = read_header(path)?;
    Ok(top
        .get("__metadata__")
        .and_then(|m| serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok())
        .unwrap_or_default())
}

/// The names of the tensors in a safetensors file (its header only is read).
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    Ok(read_header(path)?.into_keys().filter(|k| k != "__metadata__").collect())
}

/// The JSON header of a safetensors file, read without the tensors.
fn read_header(path: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad(path, "not a valid safetensors file (shorter than its header)"))?;
    let len = u64::from_le_bytes(len);
    let size = f.metadata().map_err(io(path))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(path, "not a valid safetensors file (header size out of range)"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io(path))?;
    serde_json::from_slice(&header).map_err(|e| bad(path, format!("not a valid safetensors header ({e})")))
}

/// A safetensors file read into host memory: `name → (shape, f32 values)`.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, (Shape, Vec<f32>)>> {
    let bytes = fs::read(path).map_err(io(path))?;
    Ok(parse_safetensors(path, &bytes)?.tensors)
}

/// Puts the `tensors` selected by `select` into `store`: the rest of `tensors` (less those
/// `ignore` names) must hold exactly the selected names, with equal shapes; otherwise
/// nothing is changed and the first mismatch is reported against `path`.
pub fn load_tensors<B: Backend>(
    store: &mut ParamStore<B>,
    path: &Path,
    mut file: BTreeMap<String, (Shape, Vec<f32>)>,
    select: impl Fn(&str) -> bool,
    ignore: impl Fn(&str) -> bool,
) -> Result<usize> {
    file.retain(|name, _| !ignore(name));
    let wanted: Vec<_> =
        store.iter().filter(|(_, p)| select(&p.name)).map(|(id, p)| (id, p.name.clone(), B::shape(&p.value))).collect();
    let mut staged = Vec::with_capacity(wanted.len());
    for (id, name, shape) in wanted {
        let (s, v) = file.remove(&name).ok_or_else(|| bad(path, format!("missing tensor {name}")))?;
        if s != shape {
            return Err(bad(path, format!("tensor {name} has shape {s}, the model expects {shape}")));
        }
        if v.iter().any(|x| !x.is_finite()) {
            return Err(bad(path, format!("tensor {name} holds NaN or infinite values")));
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

/// Loads every parameter selected by `select` from a safetensors file, skipping file
/// tensors for which `ignore(name)` holds (e.g. the LISA decoder's `lisa.*` tensors when a
/// training checkpoint is loaded for inference): see [`load_tensors`].
pub fn load_params<B: Backend>(
    store: &mut ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    ignore: impl Fn(&str) -> bool,
) -> Result<usize> {
    load_tensors(store, path, read_safetensors(path)?, select, ignore)
}

/// Saves the parameters selected by `select` to one safetensors file (atomically), with
/// `metadata` besides `format = pt` and `producer = lisa`. Returns the file's digest.
pub fn save_params<B: Backend>(
    store: &ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    metadata: BTreeMap<String, String>,
) -> Result<String> {
    let tensors: Vec<(String, &B::Tensor)> =
        store.iter().filter(|(_, p)| select(&p.name)).map(|(_, p)| (p.name.clone(), &p.value)).collect();
    let mut meta =
        BTreeMap::from([("format".to_string(), "pt".to_string()), ("producer".to_string(), "lisa".to_string())]);
    meta.extend(metadata);
    let bytes = to_safetensors::<B>(&tensors, meta)?;
    write_atomic(path, &bytes)?;
    Ok(digest(&bytes))
}
