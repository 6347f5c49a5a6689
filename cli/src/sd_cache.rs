//! The cached inputs of latent-space training: the VAE latents of every target image and the
//! text embeddings of every prompt (with `""` and the validation prompts; SDXL's pooled text
//! embeddings beside them), computed once per dataset with the pipeline's own VAE and text
//! encoders, and reused for as long as the data
//! list, the resolution, the prompts and the encoders' files are the same (a key in each
//! file's metadata). Files the user made are never overwritten: a file in the cache folder
//! without lisa's key is refused.
//!
//! The key holds the SHA-256 of every encoder file (VAE, text encoder, tokenizer: ~0.8 GB at
//! SD 1.5's size). Reading them all on every start would cost more than the rest of it, so
//! [`DIGESTS_FILE`] beside the cache records each file's digest with the file's size,
//! modification time and (for `.safetensors`) the digest of its JSON header when it was
//! hashed; a file is hashed again when any of those changed, when it is new, or when it was
//! modified within [`SETTLED`] of its hashing (a write in the same timestamp tick could
//! otherwise keep size, time and header).
//!
//! A cache folder may be shared by runs: [`CACHE_LOCK`] is held shared by every run that
//! uses the cache (for as long as it runs) and exclusively by the one that writes it, so a
//! run never reads a cache another run is rewriting, and a run made from other inputs
//! (another text encoder, resolution or data) cannot replace a cache a running run uses: it
//! is refused, naming the folder. The model records the embeddings' digest and the dataset
//! the latents', so that a resume checks them by content.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::model::PromptEmbedding;
use lisa_trainer::model::sd::{MixedPrecision, Pipeline, SdxlTextEncoders, TextEncoder, Vae, encode_prompt_tables};
use lisa_trainer::tensor_file::TensorFileWriter;
use lisa_trainer::weights::{digest, read_metadata, write_atomic};
use serde::{Deserialize, Serialize};

use crate::fill50k::{Fill50k, LATENTS_FILE, Layout};
use crate::image::{Resample, read_image};

/// The text embeddings file's name.
pub const EMBEDDINGS_FILE: &str = "prompt_embeds.safetensors";
/// The pooled text embeddings file's name (SDXL, SD3).
pub const POOLED_EMBEDDINGS_FILE: &str = "pooled_prompt_embeds.safetensors";
/// The metadata key holding what a cache was made from.
pub(crate) const KEY: &str = "lisa.cache_key";
/// The lock file in a cache folder.
pub const CACHE_LOCK: &str = ".lisa-cache.lock";

/// Where the cached inputs are, and the cache folder's lock, held (shared) while this lives.
#[derive(Debug)]
pub struct Cache {
    /// One latent per target, named by its `target` field.
    pub latents: PathBuf,
    /// One `[tokens, dim]` embedding per prompt, named by the prompt.
    pub embeddings: PathBuf,
    /// SDXL: one `[1, pooled_dim]` pooled embedding per prompt, named by the prompt.
    pub pooled: Option<PathBuf>,
    /// The cache folder's lock (None: the data folder's own precomputed files).
    pub lock: Option<std::fs::File>,
}

/// `path` made absolute with every existing part's links resolved (the part that does not
/// exist yet appended as written), so that two spellings of one place compare equal.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
    let mut out = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    out.extend(rest.iter().rev());
    out
}

/// Refuses a cache folder inside (or equal to) the data folder: lisa writes nothing among
/// the user's data.
pub(crate) fn check_outside(cache_dir: &Path, data: &Path) -> Result<()> {
    if resolved(cache_dir).starts_with(resolved(data)) {
        bail!(
            "--cache-dir {} is inside the data folder {}: lisa writes nothing among your data; choose a cache folder outside it",
            cache_dir.display(),
            data.display()
        );
    }
    Ok(())
}

/// Opens the cache folder's lock file (creating the folder).
fn open_lock(cache_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(cache_dir).with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let path = cache_dir.join(CACHE_LOCK);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot write in the cache folder {}", cache_dir.display()))
}

/// Takes `lock` shared, waiting (with a note) while another run writes the cache.
fn lock_shared(lock: &std::fs::File, cache_dir: &Path) -> Result<()> {
    match lock.try_lock_shared() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("waiting for another lisa run to finish writing the cache in {}", cache_dir.display());
            lock.lock_shared().with_context(|| format!("cannot lock {}", cache_dir.join(CACHE_LOCK).display()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", cache_dir.join(CACHE_LOCK).display()))
        }
    }
}

/// The digest of every file in `dir` (sorted by name), or of nothing when absent; each file's
/// digest from `digests` (recorded, or hashed now).
pub(crate) fn folder_digest(dir: &Path, digests: &mut FileDigests) -> Result<String> {
    let mut parts = Vec::new();
    if dir.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        let folder = dir.file_name().unwrap_or_default().to_string_lossy();
        for p in names {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let file_digest = digests.digest_of(&p, &format!("{folder}/{name}"))?;
            parts.push(format!("{name}:{file_digest}"));
        }
    }
    Ok(digest(parts.join(",").as_bytes()))
}

/// The record of the encoder files' digests, beside the cache.
pub const DIGESTS_FILE: &str = "encoder_digests.json";
/// The `format` of [`DIGESTS_FILE`] (a record with another `lisa.encoder_digests` format is
/// lisa's and is rewritten; a file without one is the user's and is refused).
const DIGESTS_FORMAT: &str = "lisa.encoder_digests.v1";
/// A recorded digest is trusted only for a file last modified at least this long before its
/// hashing began: a write within a timestamp's granularity of that moment (2 s on FAT) could
/// leave size, time and header as recorded.
const SETTLED: Duration = Duration::from_secs(3);

/// What tells a file's contents apart without reading them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// Bytes.
    size: u64,
    /// Modification time, `(seconds, nanoseconds)` since the Unix epoch (None: unknown).
    modified: Option<(u64, u32)>,
    /// The digest of a `.safetensors` file's JSON header (None: not one, or unreadable).
    header: Option<String>,
}

/// A file's digest and what it looked like when its hashing began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    stamp: Stamp,
    /// When the hashing began, `(seconds, nanoseconds)` since the Unix epoch.
    hashed_at: (u64, u32),
    /// The SHA-256 of the contents.
    digest: String,
}

/// [`DIGESTS_FILE`]'s contents: per file (absolute path), its recorded digest.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    format: String,
    files: BTreeMap<String, Recorded>,
}

fn since_epoch(t: SystemTime) -> Option<(u64, u32)> {
    t.duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| (d.as_secs(), d.subsec_nanos()))
}

/// The digest of a `.safetensors` file's header (its first `8 + n` bytes, `n` the
/// little-endian length they start with), or None when it has none that can be read.
fn header_digest(path: &Path) -> Option<String> {
    if path.extension().is_none_or(|e| e != "safetensors") {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    Some(digest(&header))
}

fn stamp(path: &Path) -> Result<Stamp> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Stamp { size: meta.len(), modified: meta.modified().ok().and_then(since_epoch), header: header_digest(path) })
}

/// Whether `recorded` still gives the digest of a file that now has `now`: the same stamp, and
/// a modification time at least [`SETTLED`] before the hashing began.
fn still_valid(recorded: &Recorded, now: &Stamp) -> bool {
    let at = |(s, n): (u64, u32)| Duration::new(s, n);
    recorded.stamp == *now && now.modified.is_some_and(|m| at(m) + SETTLED <= at(recorded.hashed_at))
}

/// The encoder files' digests for one start: recorded ones reused, the others hashed and
/// recorded.
pub(crate) struct FileDigests {
    path: PathBuf,
    before: BTreeMap<String, Recorded>,
    now: BTreeMap<String, Recorded>,
    /// `(label, bytes)` of every file hashed in this start.
    hashed: Vec<(String, u64)>,
}

impl FileDigests {
    /// The record in `cache_dir` (empty when absent). A file there that is not lisa's record
    /// is the user's: an error.
    pub(crate) fn open(cache_dir: &Path) -> Result<Self> {
        let path = cache_dir.join(DIGESTS_FILE);
        let mut before = BTreeMap::new();
        if path.exists() {
            let refuse = || {
                anyhow::anyhow!(
                    "{} exists and is not lisa's record of encoder digests; choose another --cache-dir or move it",
                    path.display()
                )
            };
            let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| refuse())?;
            if !value["format"].as_str().is_some_and(|f| f.starts_with("lisa.encoder_digests")) {
                return Err(refuse());
            }
            // lisa's record in another format, or damaged: everything is hashed and it is rewritten.
            if let Ok(record) = serde_json::from_value::<Record>(value)
                && record.format == DIGESTS_FORMAT
            {
                before = record.files;
            }
        }
        Ok(FileDigests { path, before, now: BTreeMap::new(), hashed: Vec::new() })
    }

    /// The digest of the file at `path` (`label` names it in messages): the recorded one if
    /// the file still has the stamp it had then, else its contents hashed now.
    fn digest_of(&mut self, path: &Path, label: &str) -> Result<String> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).to_string_lossy().into_owned();
        let stamp = stamp(path)?;
        if let Some(recorded) = self.before.get(&key).filter(|r| still_valid(r, &stamp)) {
            let digest = recorded.digest.clone();
            self.now.insert(key, recorded.clone());
            return Ok(digest);
        }
        // The stamp is taken before the contents are read: a write during the read leaves a
        // stamp that the next start does not match.
        let hashed_at = since_epoch(SystemTime::now()).unwrap_or_default();
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file_digest = digest(&bytes);
        self.hashed.push((label.to_string(), bytes.len() as u64));
        self.now.insert(key, Recorded { stamp, hashed_at, digest: file_digest.clone() });
        Ok(file_digest)
    }

    /// Says which files were hashed, and writes the record (atomically) when it changed.
    pub(crate) fn finish(self) -> Result<()> {
        if self.hashed.is_empty() {
            eprintln!(
                "encoder files unchanged since their digests were recorded: {} files not re-read",
                self.now.len()
            );
        } else {
            let bytes: u64 = self.hashed.iter().map(|h| h.1).sum();
            let names: Vec<&str> = self.hashed.iter().map(|h| h.0.as_str()).collect();
            eprintln!(
                "hashed {} of {} encoder files (new, or changed in size, time or header; {:.1} MB): {}",
                self.hashed.len(),
                self.now.len(),
                bytes as f64 / 1e6,
                names.join(", ")
            );
        }
        if self.now != self.before {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let record = Record { format: DIGESTS_FORMAT.to_string(), files: self.now };
            write_atomic(&self.path, &serde_json::to_vec_pretty(&record)?)?;
        }
        Ok(())
    }
}

/// Whether `path` is a lisa cache made with `key` (`Some(false)`: lisa's, other key; `None`:
/// absent). A file that is not lisa's cache is an error: it is the user's.
fn cache_state(path: &Path, key: &str) -> Result<Option<bool>> {
    if !path.exists() {
        return Ok(None);
    }
    let meta = read_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    match meta.get(KEY) {
        Some(k) => Ok(Some(k == key)),
        None => bail!("{} exists and is not a lisa cache; choose another --cache-dir or move it", path.display()),
    }
}

/// The latents and embeddings for training on `data` at `resolution` px with `pipeline`:
/// the data folder's own precomputed files when it has them all (SDXL: the pooled embeddings
/// too), else the cache in `cache_dir`, made now if missing or stale.
pub fn prepare<B: Backend>(
    pipeline: &Pipeline,
    data: &Path,
    cache_dir: &Path,
    resolution: usize,
    extra_prompts: &[String],
    precision: MixedPrecision,
    device: B::Device,
) -> Result<Cache> {
    let sdxl = pipeline.is_sdxl()?;
    let mut names = vec![LATENTS_FILE, EMBEDDINGS_FILE];
    if sdxl {
        names.push(POOLED_EMBEDDINGS_FILE);
    }
    let own: Vec<PathBuf> = names.iter().map(|n| data.join(n)).collect();
    if own.iter().all(|p| p.is_file()) {
        eprintln!("using the precomputed {} of {}", names.join(", "), data.display());
        let pooled = own.get(2).cloned();
        return Ok(Cache { latents: own[0].clone(), embeddings: own[1].clone(), pooled, lock: None });
    }
    check_outside(cache_dir, data)?;
    let root = &pipeline.root;
    let mut text_parts = vec!["text_encoder", "tokenizer"];
    if sdxl {
        text_parts.extend(["text_encoder_2", "tokenizer_2"]);
    }
    let mut missing: Vec<String> =
        text_parts.iter().filter(|c| !root.join(c).is_dir()).map(|c| format!("{c}/")).collect();
    if !pipeline.vae.is_dir() {
        missing.insert(0, "vae/".to_string());
    }
    if !missing.is_empty() {
        bail!(
            "{} has no {}: lisa needs them to compute the latents and text embeddings (or put precomputed {} in {})",
            root.display(),
            missing.join(", "),
            names.join(" and "),
            data.display()
        );
    }
    let chunk = encoding_chunk(pipeline.vae_config()?.as_ref(), resolution)?;
    let list =
        std::fs::read(data.join("prompt.json")).with_context(|| format!("reading {}/prompt.json", data.display()))?;
    let set = Fill50k::open(
        data,
        Layout {
            image: [3, resolution, resolution],
            hint: [3, resolution, resolution],
            latents: None,
            hint_latents: None,
        },
    )?;
    let targets = set.targets_digest().unwrap_or_default();
    let mut digests = FileDigests::open(cache_dir)?;
    let mut key = format!(
        "data {} targets {targets} resolution {resolution} precision {precision:?} vae {} text_encoder {} tokenizer {} extra {:?}",
        digest(&list),
        folder_digest(&pipeline.vae, &mut digests)?,
        folder_digest(&root.join("text_encoder"), &mut digests)?,
        folder_digest(&root.join("tokenizer"), &mut digests)?,
        extra_prompts
    );
    if sdxl {
        for part in ["text_encoder_2", "tokenizer_2"] {
            key.push_str(&format!(" {part} {}", folder_digest(&root.join(part), &mut digests)?));
        }
    }
    let key = digest(key.as_bytes());
    let cached: Vec<PathBuf> = names.iter().map(|n| cache_dir.join(n)).collect();
    let refs: Vec<&Path> = cached.iter().map(PathBuf::as_path).collect();
    let lock = locked_cache(cache_dir, &key, (&refs, "latents and text embeddings"), digests, || {
        let inputs = Inputs { set: &set, resolution, extra_prompts, precision, chunk };
        write_cache::<B>(pipeline, &inputs, &cached, device, &key)
    })?;
    Ok(Cache {
        latents: cached[0].clone(),
        embeddings: cached[1].clone(),
        pooled: cached.get(2).cloned(),
        lock: Some(lock),
    })
}

/// How often a run that finds the cache neither current nor free tries again to write it.
const CACHE_ATTEMPTS: usize = 20;

/// The cache folder's lock, held shared, once `files` hold the cache made from `key`: reused
/// when they do, written by `write` (under the exclusive lock) when they do not. `digests` is
/// saved once the folder is known to be lisa's cache (or new). A cache another run holds
/// from other inputs is an error naming the folder; a file without lisa's key is refused.
pub(crate) fn locked_cache(
    cache_dir: &Path,
    key: &str,
    (files, what): (&[&Path], &str),
    digests: FileDigests,
    write: impl FnOnce() -> Result<()>,
) -> Result<std::fs::File> {
    let lock = open_lock(cache_dir)?;
    let current = || -> Result<bool> {
        for f in files {
            if cache_state(f, key)? != Some(true) {
                return Ok(false);
            }
        }
        Ok(true)
    };
    lock_shared(&lock, cache_dir)?;
    let fresh = current()?;
    // The digest record only once the folder is known to be lisa's cache (or new).
    digests.finish()?;
    let in_use = || {
        anyhow::anyhow!(
            "the cache in {} is in use by another lisa run made from other inputs (another text encoder, VAE, resolution or data); wait for it or choose another --cache-dir",
            cache_dir.display()
        )
    };
    if !fresh {
        // Written under the exclusive lock, which no run using the cache lets go. Runs that
        // start together from the same inputs (the ranks of a data-parallel run) may each
        // hold the shared lock when they try: they retry, at different moments, until one
        // writes; a run from other inputs that keeps the cache is the error below.
        let mut write = Some(write);
        for attempt in 0..CACHE_ATTEMPTS {
            lock.unlock().with_context(|| format!("cannot unlock {}", cache_dir.join(CACHE_LOCK).display()))?;
            match lock.try_lock() {
                Ok(()) => {
                    if !current()?
                        && let Some(write) = write.take()
                    {
                        write()?;
                    }
                    lock.unlock().with_context(|| format!("cannot unlock {}", cache_dir.join(CACHE_LOCK).display()))?;
                    lock_shared(&lock, cache_dir)?;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    // Another run holds the lock: a writer (wait for it below) or readers.
                    // Waiting without any lock lets a concurrent starter take it meanwhile.
                    if attempt + 1 < CACHE_ATTEMPTS {
                        let jitter = (std::process::id() as u64 * 37 + attempt as u64 * 101) % 200;
                        std::thread::sleep(std::time::Duration::from_millis(50 + jitter));
                    }
                    lock_shared(&lock, cache_dir)?;
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", cache_dir.join(CACHE_LOCK).display()));
                }
            }
            // Another run may have written it meanwhile: from these inputs, or from others.
            if current()? {
                break;
            }
        }
        if !current()? {
            return Err(in_use());
        }
    } else {
        eprintln!("using the cached {what} in {}", cache_dir.display());
    }
    Ok(lock)
}

/// The start of a prompt, quoted, with its length when cut (a prompt may be any size).
pub(crate) fn quoted_start(prompt: &str) -> String {
    const SHOWN: usize = 60;
    let chars = prompt.chars().count();
    if chars <= SHOWN {
        return format!("{prompt:?}");
    }
    let start: String = prompt.chars().take(SHOWN).collect();
    format!("{start:?}… ({chars} characters)")
}

/// Encodes the images `items` (`(name, path, line of prompt.json)`; a name listed again is
/// encoded once), each resized and centre-cropped to `resolution` px, `chunk` at a time, and
/// writes their latents to `path` (with `meta`), each named by its item, atomically. The
/// pixels enter the VAE in [−1, 1] when `signed` (training images), else in [0, 1] (SD3's
/// condition images). Returns how many were written and their `[channels, side, side]`.
pub(crate) fn write_latents<B: Backend>(
    vae: &Vae<B>,
    items: &[(String, PathBuf, usize)],
    (resolution, chunk): (usize, usize),
    signed: bool,
    path: &Path,
    meta: &BTreeMap<String, String>,
) -> Result<(usize, [usize; 3])> {
    let side = vae.config().latent_side(resolution).context("--resolution")?;
    let mut seen = BTreeSet::new();
    let items: Vec<_> = items.iter().filter(|(name, _, _)| seen.insert(name.clone())).collect();
    let shape = [vae.config().latent_channels, side, side];
    let per: usize = shape.iter().product();
    // Written as encoded: memory is one chunk of images, whatever the dataset's size.
    let names: Vec<(String, Vec<usize>)> = items.iter().map(|(name, _, _)| (name.clone(), shape.to_vec())).collect();
    let mut file = TensorFileWriter::create(path, &names, meta)?;
    for part in items.chunks(chunk) {
        let mut pixels = Vec::new();
        for (_, image, line) in part {
            let img = read_image(image, resolution, false, Resample::CenterCrop)
                .with_context(|| format!("{} (line {line} of prompt.json)", image.display()))?;
            pixels.extend(img.into_iter().map(|v| if signed { 2.0 * v - 1.0 } else { v }));
        }
        for latent in vae.latents(&pixels, part.len(), resolution)?.chunks_exact(per) {
            file.push(latent)?;
        }
    }
    file.finish()?;
    Ok((items.len(), shape))
}

/// The most images the VAE encodes at once at `resolution` px (at most 8): what fits in half
/// of this machine's memory, about four feature maps of the VAE's first level per image. An
/// error when not even one image fits, before anything is encoded.
pub(crate) fn encoding_chunk(vae: Option<&lisa_trainer::model::sd::VaeConfig>, resolution: usize) -> Result<usize> {
    let width = vae.map_or(128, |c| c.block_out_channels[0]);
    let per_image = (width as u128) * (resolution as u128).pow(2) * 4 * 4;
    let budget = crate::config::memory_bytes() as u128 / 2;
    if per_image > budget {
        bail!(
            "encoding one {resolution} px image with the VAE needs about {:.1} GiB; this machine has {:.1} GiB; lower --resolution",
            per_image as f64 / (1u64 << 30) as f64,
            2.0 * budget as f64 / (1u64 << 30) as f64
        );
    }
    Ok((budget / per_image.max(1)).clamp(1, 8) as usize)
}

/// What a cache is made from.
struct Inputs<'a> {
    set: &'a Fill50k,
    resolution: usize,
    extra_prompts: &'a [String],
    precision: MixedPrecision,
    /// Images per VAE call.
    chunk: usize,
}

/// Computes and writes the cache made from `key`'s inputs into `files` (latents, text
/// embeddings and, for SDXL, pooled embeddings), under the cache's exclusive lock.
fn write_cache<B: Backend>(
    pipeline: &Pipeline,
    inputs: &Inputs,
    files: &[PathBuf],
    device: B::Device,
    key: &str,
) -> Result<()> {
    let Inputs { set, resolution, extra_prompts, precision, chunk } = *inputs;
    let root = &pipeline.root;
    let started = std::time::Instant::now();
    let meta = BTreeMap::from([(KEY.to_string(), key.to_string()), ("resolution".to_string(), resolution.to_string())]);

    // The text embeddings: every distinct prompt, the null prompt, the validation prompts.
    let mut prompts: BTreeSet<String> = set.prompts().map(str::to_string).collect();
    prompts.insert(String::new());
    prompts.extend(extra_prompts.iter().cloned());
    let prompts: Vec<String> = prompts.into_iter().collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let loading = || format!("loading the text encoders of {}", root.display());
    let (cut, tokens) = match files.get(2) {
        Some(pooled) => {
            let text = SdxlTextEncoders::<B>::open(root, device.clone(), precision.dtype()).with_context(loading)?;
            (text.write_tables(&refs, (&files[1], pooled), &meta)?, text.tokens())
        }
        None => {
            let text = TextEncoder::<B>::open(
                &root.join("text_encoder"),
                &root.join("tokenizer"),
                device.clone(),
                precision.dtype(),
            )
            .with_context(loading)?;
            let (mut cut, mut tokens) = (Vec::new(), 0);
            encode_prompt_tables(&refs, (&files[1], None), &meta, |chunk| {
                let emb = text.embed(chunk)?;
                cut.extend(emb.truncated.iter().map(|&i| chunk[i].to_string()));
                tokens = emb.tokens;
                Ok(PromptEmbedding::Text { values: emb.values, tokens, dim: emb.dim })
            })?;
            (cut, tokens)
        }
    };
    for prompt in &cut {
        eprintln!("warning: prompt {} is longer than {tokens} tokens and was truncated", quoted_start(prompt));
    }

    // The latents of every target image (resized and centre-cropped to the resolution).
    let vae = Vae::<B>::open(&pipeline.vae, device, pipeline.vae_dtype(precision)?)
        .with_context(|| format!("loading the VAE {}", pipeline.vae.display()))?;
    let items: Vec<(String, PathBuf, usize)> =
        set.targets().map(|(n, p, l)| (n.to_string(), p.to_path_buf(), l)).collect();
    let (count, [lc, side, _]) = write_latents(&vae, &items, (resolution, chunk), true, &files[0], &meta)?;
    eprintln!(
        "cached {count} latents ({lc}×{side}×{side}) and {} prompts' text embeddings in {} ({:.1} s)",
        prompts.len(),
        files[0].parent().unwrap_or(Path::new(".")).display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lisa_core::backend::Shape;
    use lisa_trainer::weights::host_to_safetensors;

    fn write_safetensors(path: &Path, note: &str) {
        let values = [0.5f32; 4];
        let meta = BTreeMap::from([("note".to_string(), note.to_string())]);
        std::fs::write(path, host_to_safetensors(&[("w".to_string(), Shape::new([4]), &values[..])], meta).unwrap())
            .unwrap();
    }

    fn set_modified(path: &Path, when: SystemTime) {
        std::fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
    }

    /// Opens the record in `dir`, takes the digest of `file`, writes the record back; returns the
    /// digest and whether the file was hashed.
    fn start(dir: &Path, file: &Path) -> (String, bool) {
        let mut digests = FileDigests::open(dir).unwrap();
        let d = digests.digest_of(file, "w.safetensors").unwrap();
        let hashed = !digests.hashed.is_empty();
        digests.finish().unwrap();
        (d, hashed)
    }

    #[test]
    fn a_recorded_digest_holds_only_while_size_time_and_header_do() {
        let dir = std::env::temp_dir().join(format!("lisa-sd-cache-digests-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("w.safetensors");
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        write_safetensors(&file, "a");
        set_modified(&file, hour_ago);
        let (first, hashed) = start(&dir, &file);
        assert!(hashed, "a new file is hashed");
        assert_eq!(first, digest(&std::fs::read(&file).unwrap()));
        assert_eq!(start(&dir, &file), (first.clone(), false), "unchanged: the recorded digest");

        // Another header of the same size, the same modification time: hashed again.
        write_safetensors(&file, "b");
        set_modified(&file, hour_ago);
        let (second, hashed) = start(&dir, &file);
        assert!(hashed && second != first, "an edited header is seen");
        assert_eq!(start(&dir, &file), (second.clone(), false));

        // Modified just now: hashed at the next start too, until the time lies SETTLED before a
        // hashing (a same-tick write could have kept the stamp).
        set_modified(&file, SystemTime::now());
        assert_eq!(start(&dir, &file), (second.clone(), true));
        assert_eq!(start(&dir, &file), (second.clone(), true), "too recent to trust");
        set_modified(&file, hour_ago);
        assert_eq!(start(&dir, &file), (second.clone(), true), "another time: hashed");
        assert_eq!(start(&dir, &file), (second, false));

        // A record in another lisa format is rewritten; a file that is not lisa's is refused.
        std::fs::write(dir.join(DIGESTS_FILE), br#"{"format": "lisa.encoder_digests.v0"}"#).unwrap();
        assert!(start(&dir, &file).1);
        std::fs::write(dir.join(DIGESTS_FILE), b"mine").unwrap();
        let err = FileDigests::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("not lisa's record"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
