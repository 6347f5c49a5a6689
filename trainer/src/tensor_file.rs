//! Safetensors files of many tensors read and written one tensor at a time: the latents of a
//! dataset and the text embeddings of its prompts, which at real sizes do not fit in memory
//! (Fill50K at 512 px: 3.2 GB of latents and, with a caption per image, 12 GB of CLIP
//! embeddings; T5's 512 × 4096 per prompt makes that 400 GB for SD3 and Flux).
//!
//! [`TensorFileWriter`] writes the header first (every name and shape is known before the
//! first value is computed), then each tensor as it comes, into a temporary file renamed into
//! place at the end: memory is one tensor, and a stopped run leaves no partial file under the
//! real name. [`TensorFile`] reads the header once and each tensor on demand. Both are plain
//! safetensors (Python's `safetensors` reads what the writer writes; the reader reads any
//! file of f32, f16 or bf16 tensors).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
#[cfg(not(unix))]
use std::sync::Mutex;

use crate::error::{Result, TrainError};
use crate::weights::{bad, io};

/// The largest header lisa reads (the safetensors crate's own bound).
const MAX_HEADER: u64 = 100 << 20;

/// How a tensor's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    F32,
    F16,
    BF16,
}

impl Stored {
    fn bytes(self) -> usize {
        match self {
            Stored::F32 => 4,
            Stored::F16 | Stored::BF16 => 2,
        }
    }

    /// Little-endian stored values as f32.
    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Stored::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Stored::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Stored::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }
}

/// Where one tensor is in the file.
#[derive(Debug, Clone)]
struct Entry {
    stored: Stored,
    shape: Vec<usize>,
    /// Byte range within the data section.
    start: u64,
    end: u64,
}

/// A safetensors file whose tensors are read one at a time, on demand.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    file: File,
    /// The file's size when opened.
    size: u64,
    /// Serialises seek + read where there is no positioned read.
    #[cfg(not(unix))]
    seek: Mutex<()>,
    /// Where the data section starts (8 + the header's length).
    data_start: u64,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Opens `path` and reads its header: every tensor's dtype (f32, f16 or bf16), shape and
    /// place, checked against the file's size. No value is read.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(io(path))?;
        let size = file.metadata().map_err(io(path))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|_| bad(path, "not a valid safetensors file (shorter than its header)"))?;
        let len = u64::from_le_bytes(len);
        if len > size.saturating_sub(8) || len > MAX_HEADER {
            return Err(bad(path, "not a valid safetensors file (header size out of range)"));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(io(path))?;
        let top: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| bad(path, format!("not a valid safetensors header ({e})")))?;
        let data_len = size - 8 - len;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, value) in top {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value)
                    .map_err(|e| bad(path, format!("its __metadata__ is not a map of strings ({e})")))?;
                continue;
            }
            let entry = parse_entry(&value)
                .ok_or_else(|| bad(path, format!("tensor {name:?}: not a dtype, shape and data_offsets")))?
                .map_err(|dtype| bad(path, format!("tensor {name:?} has dtype {dtype}, expected F32, F16 or BF16")))?;
            let elements = entry.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let expected = elements.and_then(|n| n.checked_mul(entry.stored.bytes()));
            if entry.end < entry.start
                || entry.end > data_len
                || expected.is_none_or(|b| b as u64 != entry.end - entry.start)
            {
                return Err(bad(
                    path,
                    format!(
                        "tensor {name:?}: its data_offsets do not hold {:?} values (a truncated file?)",
                        entry.shape
                    ),
                ));
            }
            entries.insert(name, entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            #[cfg(not(unix))]
            seek: Mutex::new(()),
            data_start: 8 + len,
            entries,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensors' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The shape of tensor `name`, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The values of tensor `name` as f32 (None: no such tensor), read from the file now.
    pub fn read(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some(entry) = self.entries.get(name) else { return Ok(None) };
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        self.read_at(&mut bytes, self.data_start + entry.start)?;
        Ok(Some(entry.stored.decode(&bytes)))
    }

    /// The SHA-256 of the whole file (as [`crate::weights::digest`] of its bytes), read in
    /// pieces through the handle the tensors are read from (the same file, even if the path
    /// was replaced since it was opened).
    pub fn digest(&self) -> Result<String> {
        self.digest_visiting(|_, _| Ok(()))
    }

    /// [`digest`](Self::digest), handing every tensor's values to `visit` (name, values) on
    /// the way, in file order: one read of the file both checks and hashes it. The first error
    /// `visit` returns stops it.
    pub fn digest_visiting(&self, mut visit: impl FnMut(&str, &[f32]) -> Result<()>) -> Result<String> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        let mut by_place: Vec<(&String, &Entry)> = self.entries.iter().collect();
        by_place.sort_by_key(|(_, e)| e.start);
        // Every byte is hashed once, in order: the header and any gap, then each tensor (the
        // part of it not hashed already, should tensors overlap), then what follows the last.
        let mut hashed = 0u64;
        for (name, entry) in by_place {
            let (start, end) = (self.data_start + entry.start, self.data_start + entry.end);
            self.hash_range(&mut hasher, hashed, start)?;
            hashed = hashed.max(start);
            let mut bytes = vec![0u8; (end - start) as usize];
            self.read_at(&mut bytes, start)?;
            if end > hashed {
                hasher.update(&bytes[(hashed - start) as usize..]);
                hashed = end;
            }
            visit(name, &entry.stored.decode(&bytes))?;
        }
        self.hash_range(&mut hasher, hashed, self.size)?;
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Hashes bytes `from..to` of the file into `hasher` (nothing when `from >= to`).
    fn hash_range(&self, hasher: &mut sha2::Sha256, from: u64, to: u64) -> Result<()> {
        use sha2::Digest;
        let mut buf = vec![0u8; (1 << 20).min(to.saturating_sub(from)) as usize];
        let mut at = from;
        while at < to {
            let n = buf.len().min((to - at) as usize);
            self.read_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Fills `buf` from byte `offset` of the file: a positioned read (threads read at once).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset).map_err(io(&self.path))
        }
        #[cfg(not(unix))]
        {
            let _one_at_a_time = self.seek.lock().unwrap_or_else(|e| e.into_inner());
            let mut file = &self.file;
            file.seek(SeekFrom::Start(offset)).map_err(io(&self.path))?;
            file.read_exact(buf).map_err(io(&self.path))
        }
    }
}

/// A header entry: its place and shape, or `Err(dtype)` for a dtype lisa does not read.
fn parse_entry(value: &serde_json::Value) -> Option<std::result::Result<Entry, String>> {
    let dtype = value.get("dtype")?.as_str()?;
    let shape =
        value.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>()?;
    let offsets = value.get("data_offsets")?.as_array()?;
    let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
    let stored = match dtype {
        "F32" => Stored::F32,
        "F16" => Stored::F16,
        "BF16" => Stored::BF16,
        other => return Some(Err(other.to_string())),
    };
    Some(Ok(Entry { stored, shape, start, end }))
}

/// Writes a safetensors file of f32 tensors one at a time, in the order named when it was
/// created; the file appears under its name only when [`finish`](Self::finish) succeeds.
pub struct TensorFileWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    /// `(name, element count)` of every tensor, in order, and how many were written.
    tensors: Vec<(String, usize)>,
    written: usize,
}

impl TensorFileWriter {
    /// Starts `path` for `tensors` (`name`, shape), each to be given in this order, with
    /// string `metadata`: the header is written now. A repeated name is an error.
    pub fn create(path: &Path, tensors: &[(String, Vec<usize>)], metadata: &BTreeMap<String, String>) -> Result<Self> {
        let mut header = BTreeMap::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".to_string(), serde_json::json!(metadata));
        }
        let mut offset = 0u64;
        let mut order = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let elements: usize = shape.iter().product();
            let end = offset + 4 * elements as u64;
            let entry = serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]});
            if name == "__metadata__" || header.insert(name.clone(), entry).is_some() {
                return Err(TrainError::Serialize(format!("tensor {name:?} named twice (or reserved)")));
            }
            order.push((name.clone(), elements));
            offset = end;
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| TrainError::Serialize(e.to_string()))?;
        // The data section starts 8-byte aligned, as the safetensors writer pads it.
        json.resize(json.len().next_multiple_of(8), b' ');
        // Said before anything is computed: a file with a larger header no reader opens.
        if json.len() as u64 > MAX_HEADER {
            return Err(TrainError::Serialize(format!(
                "{}: {} tensors make a header of {:.0} MB; safetensors readers take at most {} MB",
                path.display(),
                tensors.len(),
                json.len() as f64 / 1e6,
                MAX_HEADER >> 20
            )));
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        // One name per file (the writers of a cache hold its lock): a file a stopped run left
        // is overwritten by the next, not left beside it.
        let tmp = dir.join(format!(".{file_name}.partial"));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io(path))?);
        let mut writer = Self { path: path.to_path_buf(), tmp, out: None, tensors: order, written: 0 };
        out.write_all(&(json.len() as u64).to_le_bytes()).and_then(|()| out.write_all(&json)).map_err(io(path))?;
        writer.out = Some(out);
        Ok(writer)
    }

    /// Writes the next tensor's values; they must be finite and of its size.
    pub fn push(&mut self, values: &[f32]) -> Result<()> {
        let (name, elements) = self
            .tensors
            .get(self.written)
            .ok_or_else(|| TrainError::Serialize(format!("{}: more tensors than named", self.path.display())))?;
        if values.len() != *elements {
            return Err(TrainError::Serialize(format!("tensor {name}: {} values for {elements}", values.len())));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFiniteTensor { tensor: name.clone() });
        }
        let out = self.out.as_mut().ok_or(TrainError::Internal("a finished tensor file"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes).map_err(io(&self.path))?;
        self.written += 1;
        Ok(())
    }

    /// Checks that every named tensor was written, then syncs the file and renames it into
    /// place (its folder synced too).
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.tensors.len() {
            return Err(TrainError::Serialize(format!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.written,
                self.tensors.len()
            )));
        }
        let out = self.out.take().ok_or(TrainError::Internal("a finished tensor file"))?;
        let file = out.into_inner().map_err(|e| TrainError::Io { path: self.path.clone(), error: e.into_error() })?;
        file.sync_all().map_err(io(&self.path))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io(&self.path))?;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Drop for TensorFileWriter {
    /// An unfinished file (an error, a panic) leaves nothing behind.
    fn drop(&mut self) {
        if self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lisa_core::backend::Shape;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lisa-tensor-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// What the writer streams is a safetensors file the safetensors crate reads back, with
    /// the values and metadata given; the reader reads it (and the crate's own files) tensor
    /// by tensor, and hashes it as the whole-file digest does.
    #[test]
    fn streamed_files_are_safetensors_and_read_back_one_tensor_at_a_time() {
        let d = dir("roundtrip");
        let meta = BTreeMap::from([("lisa.cache_key".to_string(), "k".to_string())]);
        let tensors = vec![("b".to_string(), vec![2, 3]), ("a".to_string(), vec![1]), ("".to_string(), vec![2])];
        let values: Vec<Vec<f32>> = vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5], vec![7.0], vec![0.25, -0.0]];
        let path = d.join("streamed.safetensors");
        let mut w = TensorFileWriter::create(&path, &tensors, &meta).unwrap();
        for v in &values {
            w.push(v).unwrap();
        }
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let parsed = crate::weights::parse_safetensors(&path, &bytes).unwrap();
        assert_eq!(parsed.metadata, meta);
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.metadata(), &meta);
        assert_eq!(file.digest().unwrap(), crate::weights::digest(&bytes));
        let mut visited = Vec::new();
        let digest = file.digest_visiting(|name, v| {
            visited.push((name.to_string(), v.to_vec()));
            Ok(())
        });
        assert_eq!(digest.unwrap(), crate::weights::digest(&bytes), "one pass: the same digest");
        let in_order: Vec<(String, Vec<f32>)> =
            tensors.iter().map(|(n, _)| n.clone()).zip(values.iter().cloned()).collect();
        assert_eq!(visited, in_order, "every tensor once, in file order");
        for ((name, shape), v) in tensors.iter().zip(&values) {
            assert_eq!(parsed.tensors[name], (Shape::new(shape.clone()), v.clone()));
            assert_eq!(file.shape(name), Some(shape.as_slice()));
            assert_eq!(file.read(name).unwrap().as_ref(), Some(v));
        }
        assert_eq!(file.read("missing").unwrap(), None);
        // A file the safetensors crate wrote, in half precision.
        let half = d.join("half.safetensors");
        let h: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::tensor::Dtype::BF16, vec![2], &h).unwrap();
        safetensors::tensor::serialize_to_file([("x", view)], None, &half).unwrap();
        assert_eq!(TensorFile::open(&half).unwrap().read("x").unwrap(), Some(vec![1.5, -2.0]));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Wrong sizes, non-finite values, missing tensors and truncated files are errors, and an
    /// unfinished writer leaves no file.
    #[test]
    fn bad_tensors_and_files_are_errors_and_leave_nothing() {
        let d = dir("bad");
        let path = d.join("t.safetensors");
        let tensors = vec![("x".to_string(), vec![2]), ("y".to_string(), vec![2])];
        let mut w = TensorFileWriter::create(&path, &tensors, &BTreeMap::new()).unwrap();
        assert!(w.push(&[1.0]).unwrap_err().to_string().contains("1 values for 2"));
        assert!(matches!(w.push(&[1.0, f32::NAN]), Err(TrainError::NonFiniteTensor { .. })));
        w.push(&[1.0, 2.0]).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("1 of 2 tensors written"));
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing left behind");
        // A header no reader would open is refused before any value is written.
        let long = vec![("n".repeat(101 << 20), vec![1])];
        let err = TensorFileWriter::create(&path, &long, &BTreeMap::new()).err().unwrap().to_string();
        assert!(err.contains("safetensors readers take at most 100 MB"), "{err}");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "nothing left behind");
        let twice = vec![("x".to_string(), vec![1]), ("x".to_string(), vec![1])];
        assert!(TensorFileWriter::create(&path, &twice, &BTreeMap::new()).is_err());
        let mut w = TensorFileWriter::create(&path, &tensors, &BTreeMap::new()).unwrap();
        w.push(&[1.0, 2.0]).unwrap();
        w.push(&[3.0, 4.0]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let err = TensorFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, b"short").unwrap();
        assert!(TensorFile::open(&path).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
