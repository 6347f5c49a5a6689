//! A dataset converted once into the Fill50K layout in the cache (`cache/datasets/<key>/`:
//! `source/`, `target/`, `prompt.json`), from Hugging Face `datasets` files
//! ([`crate::hf_dataset`]) or webdataset shards ([`crate::webdataset`]): the folder is named
//! by a digest of the inputs, written under a lock (ranks started together convert it once),
//! into a partial folder renamed at the end (a stopped conversion leaves nothing under the
//! real name), and reused by later runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

/// The marker a converted folder holds (its key and row count), written last.
const MARKER: &str = "lisa-dataset.json";

/// The column names given on the command line (None: train_controlnet.py's positional default).
#[derive(Debug, Clone, Default)]
pub struct Columns {
    /// The target images (`--image-column`; default the first column).
    pub image: Option<String>,
    /// The condition images (`--conditioning-image-column`; default the third).
    pub conditioning: Option<String>,
    /// The prompts (`--caption-column`; default the second).
    pub caption: Option<String>,
    /// Skip (and count) rows that cannot be read instead of stopping (`--skip-bad-rows`).
    pub skip_bad_rows: bool,
}

/// The file extension of an image's bytes, or what it is instead.
fn image_extension(bytes: &[u8]) -> std::result::Result<&'static str, String> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Ok("png"),
        [0xff, 0xd8, 0xff, ..] => Ok("jpg"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Err("a WebP image".into()),
        [b'G', b'I', b'F', ..] => Err("a GIF image".into()),
        _ => Err("not an image".into()),
    }
}

/// The dataset's key: the input files (names, sizes, modification times) and the columns.
pub fn files_key(files: &[&Path], columns: &Columns, kind: &str) -> Result<String> {
    let mut listed = Vec::new();
    for path in files {
        let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let modified = meta.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok());
        listed.push(json!([path.display().to_string(), meta.len(), modified.map(|d| d.as_nanos().to_string())]));
    }
    let described = json!({"kind": kind, "files": listed, "columns": [columns.image, columns.conditioning, columns.caption], "skip_bad_rows": columns.skip_bad_rows});
    Ok(lisa_trainer::weights::digest(described.to_string().as_bytes()))
}

/// The folder `cache/datasets/<key>`: reused when an earlier run converted the same input,
/// else written now by `fill` through a [`Fill50kWriter`] (into a partial folder renamed at
/// the end, so a run stopped midway leaves nothing half-made under the real name).
pub fn converted(
    cache: &Path,
    key: &str,
    from: &str,
    skip_bad_rows: bool,
    fill: impl FnOnce(&mut Fill50kWriter) -> Result<()>,
) -> Result<PathBuf> {
    let datasets = cache.join("datasets");
    let out = datasets.join(&key[..16]);
    let marker = |folder: &Path| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(folder.join(MARKER)).ok()?).ok()
    };
    // Reused as it is (no lock needed: a finished folder is never written again).
    let reuse = |out: &Path| -> Result<Option<PathBuf>> {
        if !out.exists() {
            return Ok(None);
        }
        match marker(out) {
            Some(m) if m["key"] == key => {
                eprintln!("using the converted dataset in {} ({} rows)", out.display(), m["rows"]);
                Ok(Some(out.to_path_buf()))
            }
            _ => bail!("{} is not a dataset lisa converted (no {MARKER} with its key); move it away", out.display()),
        }
    };
    if let Some(done) = reuse(&out)? {
        return Ok(done);
    }
    std::fs::create_dir_all(&datasets).with_context(|| format!("cannot create {}", datasets.display()))?;
    // Held while this run converts: ranks (or runs) started together on the same input wait
    // here, then find the folder the first one made. Where the file system cannot lock, each
    // converts into its own partial folder and the first rename wins.
    let _lock = lock_exclusive(&out.with_extension("lock"), &out)?;
    if let Some(done) = reuse(&out)? {
        return Ok(done);
    }
    // Unique per process and moment: ranks on several nodes may share the cache.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let partial = out.with_extension(format!("partial-{}-{nanos}", std::process::id()));
    let written = Fill50kWriter::new(&partial).and_then(|mut w| {
        w.skip = skip_bad_rows;
        fill(&mut w)?;
        w.finish(key, from)
    });
    let rows = match written {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&partial, &out) {
        let _ = std::fs::remove_dir_all(&partial);
        // Another rank of the same run converted it first (a file system without locks).
        if !marker(&out).is_some_and(|m| m["key"] == key) {
            return Err(e).with_context(|| format!("moving the converted dataset to {}", out.display()));
        }
    }
    eprintln!("converted {rows} rows of {from} into {}", out.display());
    Ok(out)
}

/// Opens (creating) and locks `path` exclusively, saying so while another run holds it. None
/// where the file system does not lock (said once; the conversion then goes on without).
fn lock_exclusive(path: &Path, out: &Path) -> Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot create the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("waiting for another lisa run converting the same dataset into {}", out.display());
            file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
            Ok(Some(file))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            eprintln!("warning: cannot lock {} ({e}): converting without the lock", path.display());
            Ok(None)
        }
    }
}

/// Writes examples into a Fill50K-layout folder: `source/N.ext`, `target/N.ext` (the images'
/// own bytes) and a line of `prompt.json` each.
pub struct Fill50kWriter {
    out: PathBuf,
    prompts: String,
    rows: usize,
    /// Skip bad rows (else the first stops the conversion).
    skip: bool,
    /// Rows skipped, and the first one's error.
    skipped: (usize, Option<String>),
}

impl Fill50kWriter {
    fn new(out: &Path) -> Result<Self> {
        for folder in ["source", "target"] {
            std::fs::create_dir_all(out.join(folder)).with_context(|| format!("creating {}", out.display()))?;
        }
        Ok(Self { out: out.to_path_buf(), prompts: String::new(), rows: 0, skip: false, skipped: (0, None) })
    }

    /// An example's outcome: its error stops the conversion, or with `--skip-bad-rows` is
    /// counted (and the first one kept to report).
    pub fn or_skip(&mut self, outcome: Result<()>) -> Result<()> {
        match outcome {
            Err(e) if self.skip => {
                self.skipped.0 += 1;
                self.skipped.1.get_or_insert_with(|| format!("{e:#}"));
                Ok(())
            }
            other => other,
        }
    }

    /// Both images are of a kind lisa reads (checked before either is written, so a skipped
    /// row leaves no file).
    pub fn check(&self, target: &[u8], source: &[u8], at: &dyn Fn(&str) -> String) -> Result<()> {
        for (bytes, column) in [(target, "image"), (source, "conditioning")] {
            image_extension(bytes).map_err(|e| anyhow::anyhow!("{}: {e}; lisa reads PNG and JPEG", at(column)))?;
        }
        Ok(())
    }

    /// Adds one example; `at(column)` names where it came from in errors.
    pub fn add(&mut self, target: &[u8], source: &[u8], prompt: &str, at: &dyn Fn(&str) -> String) -> Result<()> {
        let n = self.rows;
        let write = |bytes: &[u8], folder: &str, column: &str| -> Result<String> {
            let ext =
                image_extension(bytes).map_err(|e| anyhow::anyhow!("{}: {e}; lisa reads PNG and JPEG", at(column)))?;
            let relative = format!("{folder}/{n}.{ext}");
            let path = self.out.join(&relative);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            Ok(relative)
        };
        let (target, source) = (write(target, "target", "image")?, write(source, "source", "conditioning")?);
        self.prompts += &json!({"source": source, "target": target, "prompt": prompt}).to_string();
        self.prompts.push('\n');
        self.rows += 1;
        Ok(())
    }

    /// Adds one example whose images stay where they are (`target` and `source`: paths or
    /// shard member references, [`crate::image::read_bytes`]).
    pub fn add_refs(&mut self, target: &str, source: &str, prompt: &str) {
        self.prompts += &json!({"source": source, "target": target, "prompt": prompt}).to_string();
        self.prompts.push('\n');
        self.rows += 1;
    }

    /// Writes `prompt.json` and the marker (last): the number of rows.
    fn finish(self, key: &str, from: &str) -> Result<usize> {
        if let (n @ 1.., Some(first)) = &self.skipped {
            eprintln!("--skip-bad-rows: skipped {n} row(s) of {from}; the first: {first}");
        }
        if self.rows == 0 {
            bail!("{from}: no rows");
        }
        lisa_trainer::weights::write_atomic(&self.out.join("prompt.json"), self.prompts.as_bytes())?;
        let marker = json!({"key": key, "rows": self.rows, "from": from});
        lisa_trainer::weights::write_atomic(&self.out.join(MARKER), marker.to_string().as_bytes())?;
        Ok(self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Runs started together on the same input (the ranks of a launched data-parallel run)
    /// convert it once: the others wait on the lock and reuse the folder.
    #[test]
    fn concurrent_runs_convert_a_dataset_once() {
        let cache = std::env::temp_dir().join(format!("lisa-converted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let fills = AtomicUsize::new(0);
        let key = "0123456789abcdef0123";
        let folders: Vec<PathBuf> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        converted(&cache, key, "test rows", false, |w| {
                            fills.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            w.add_refs("t.png", "s.png", "a prompt");
                            Ok(())
                        })
                        .unwrap()
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(fills.load(Ordering::SeqCst), 1, "converted once");
        assert!(folders.iter().all(|f| f == &folders[0]));
        assert_eq!(std::fs::read_to_string(folders[0].join("prompt.json")).unwrap().lines().count(), 1);
        // A finished folder is reused without taking the lock (a read-only cache works).
        let lock = folders[0].with_extension("lock");
        std::fs::remove_file(&lock).unwrap();
        let again = converted(&cache, key, "test rows", false, |_| panic!("converted again")).unwrap();
        assert_eq!(again, folders[0]);
        assert!(!lock.exists(), "no lock file made to reuse a finished folder");
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
