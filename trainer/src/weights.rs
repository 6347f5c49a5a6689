//! Weights on disk: named f32 tensors as safetensors (readable by Python's `safetensors`
//! and PyTorch), written atomically (temporary file, fsync, rename), loaded only when every
//! name and shape matches.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use lisa_core::backend::{Backend, DType, Shape};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Result, TrainError};
use crate::params::ParamStore;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
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
            Ok((
                n.as_str(),
                TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| TrainError::Serialize(e.to_string()))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| TrainError::Serialize(format!("safetensors: {e}")))
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

/// Loads every parameter selected by `select` from a safetensors file, skipping file
/// tensors for which `ignore(name)` holds (e.g. the LISA decoder's `lisa.*` tensors when a
/// training checkpoint is loaded for inference): the rest of the file must hold exactly the
/// selected names, with equal shapes; otherwise nothing is changed and the first mismatch is
/// reported.
pub fn load_params<B: Backend>(
    store: &mut ParamStore<B>,
    path: &Path,
    select: impl Fn(&str) -> bool,
    ignore: impl Fn(&str) -> bool,
) -> Result<usize> {
    let mut file = read_safetensors(path)?;
    file.retain(|name, _| !ignore(name));
    let wanted: Vec<_> =
        store.iter().filter(|(_, p)| select(&p.name)).map(|(id, p)| (id, p.name.clone(), B::shape(&p.value))).collect();
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
pub fn save_params<B: Backend>(store: &ParamStore<B>, path: &Path, select: impl Fn(&str) -> bool) -> Result<()> {
    let tensors: Vec<(String, &B::Tensor)> =
        store.iter().filter(|(_, p)| select(&p.name)).map(|(_, p)| (p.name.clone(), &p.value)).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string()), ("producer".to_string(), "lisa".to_string())]);
    write_atomic(path, &to_safetensors::<B>(&tensors, meta)?)
}
