//! The cached inputs of latent-space training: the VAE latents of every target image and the
//! text embeddings of every prompt (with `""` and the validation prompts), computed once per
//! dataset with the pipeline's own VAE and text encoder, and reused for as long as the data
//! list, the resolution, the prompts and the encoders' files are the same (a key in each
//! file's metadata). Files the user made are never overwritten: a file in the cache folder
//! without lisa's key is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_core::backend::{Backend, Shape};
use lisa_trainer::model::sd::{MixedPrecision, Pipeline, TextEncoder, Vae};
use lisa_trainer::weights::{digest, host_to_safetensors, read_metadata, write_atomic};

use crate::fill50k::{Fill50k, LATENTS_FILE, Layout};
use crate::image::{Resample, read_image};

/// The text embeddings file's name.
pub const EMBEDDINGS_FILE: &str = "prompt_embeds.safetensors";
/// The metadata key holding what a cache was made from.
const KEY: &str = "lisa.cache_key";

/// Where the cached inputs are.
#[derive(Debug, Clone)]
pub struct Cache {
    /// One latent per target, named by its `target` field.
    pub latents: PathBuf,
    /// One `[tokens, dim]` embedding per prompt, named by the prompt.
    pub embeddings: PathBuf,
}

/// The digest of every file in `dir` (sorted by name), or of nothing when absent.
fn folder_digest(dir: &Path) -> Result<String> {
    let mut parts = Vec::new();
    if dir.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        for p in names {
            let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            parts.push(format!("{}:{}", p.file_name().unwrap_or_default().to_string_lossy(), digest(&bytes)));
        }
    }
    Ok(digest(parts.join(",").as_bytes()))
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
/// the data folder's own precomputed files when it has both, else the cache in `cache_dir`,
/// made now if missing or stale.
pub fn prepare<B: Backend>(
    pipeline: &Pipeline,
    data: &Path,
    cache_dir: &Path,
    resolution: usize,
    extra_prompts: &[String],
    precision: MixedPrecision,
    device: B::Device,
) -> Result<Cache> {
    let (own_latents, own_embeddings) = (data.join(LATENTS_FILE), data.join(EMBEDDINGS_FILE));
    if own_latents.is_file() && own_embeddings.is_file() {
        eprintln!("using the precomputed {LATENTS_FILE} and {EMBEDDINGS_FILE} of {}", data.display());
        return Ok(Cache { latents: own_latents, embeddings: own_embeddings });
    }
    let root = &pipeline.root;
    let missing: Vec<&str> =
        ["vae", "text_encoder", "tokenizer"].into_iter().filter(|c| !root.join(c).is_dir()).collect();
    if !missing.is_empty() {
        bail!(
            "{} has no {}: lisa needs them to compute the latents and text embeddings (or put precomputed {LATENTS_FILE} and {EMBEDDINGS_FILE} in {})",
            root.display(),
            missing.join("/, ") + "/",
            data.display()
        );
    }
    let list =
        std::fs::read(data.join("prompt.json")).with_context(|| format!("reading {}/prompt.json", data.display()))?;
    let key = digest(
        format!(
            "data {} resolution {resolution} precision {precision:?} vae {} text_encoder {} tokenizer {} extra {:?}",
            digest(&list),
            folder_digest(&root.join("vae"))?,
            folder_digest(&root.join("text_encoder"))?,
            folder_digest(&root.join("tokenizer"))?,
            extra_prompts
        )
        .as_bytes(),
    );
    let cache = Cache { latents: cache_dir.join(LATENTS_FILE), embeddings: cache_dir.join(EMBEDDINGS_FILE) };
    let states = (cache_state(&cache.latents, &key)?, cache_state(&cache.embeddings, &key)?);
    if states == (Some(true), Some(true)) {
        eprintln!("using the cached latents and text embeddings in {}", cache_dir.display());
        return Ok(cache);
    }
    std::fs::create_dir_all(cache_dir).with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let started = std::time::Instant::now();
    let meta = BTreeMap::from([(KEY.to_string(), key.clone()), ("resolution".to_string(), resolution.to_string())]);

    // The text embeddings: every distinct prompt, the null prompt, the validation prompts.
    let set = Fill50k::open(
        data,
        Layout { image: [3, resolution, resolution], hint: [3, resolution, resolution], latents: None },
    )?;
    let mut prompts: BTreeSet<String> = set.prompts().map(str::to_string).collect();
    prompts.insert(String::new());
    prompts.extend(extra_prompts.iter().cloned());
    let prompts: Vec<String> = prompts.into_iter().collect();
    let text =
        TextEncoder::<B>::open(&root.join("text_encoder"), &root.join("tokenizer"), device.clone(), precision.dtype())
            .with_context(|| format!("loading the text encoder of {}", root.display()))?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let emb = text.embed(&refs)?;
    for &i in &emb.truncated {
        eprintln!("warning: prompt {:?} is longer than {} tokens and was truncated", prompts[i], emb.tokens);
    }
    let per = emb.tokens * emb.dim;
    let tensors: Vec<(String, Shape, &[f32])> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), Shape::new([emb.tokens, emb.dim]), &emb.values[i * per..(i + 1) * per]))
        .collect();
    write_atomic(&cache.embeddings, &host_to_safetensors(&tensors, meta.clone())?)?;

    // The latents of every target image (resized and centre-cropped to the resolution).
    let vae = Vae::<B>::open(&root.join("vae"), device, precision.dtype())
        .with_context(|| format!("loading the VAE of {}", root.display()))?;
    let f = vae.config().block_out_channels.len();
    let factor = 1usize << (f - 1);
    if !resolution.is_multiple_of(factor) {
        bail!("--resolution {resolution} is not a multiple of the VAE's downscale {factor}");
    }
    let mut names = Vec::new();
    let mut latents = Vec::new();
    let targets: Vec<(String, PathBuf, usize)> =
        set.targets().map(|(n, p, l)| (n.to_string(), p.to_path_buf(), l)).collect();
    let mut seen = BTreeSet::new();
    for chunk in targets.chunks(8) {
        let mut pixels = Vec::new();
        let mut count = 0;
        for (name, path, line) in chunk {
            if !seen.insert(name.clone()) {
                continue;
            }
            let img = read_image(path, resolution, false, Resample::CenterCrop)
                .with_context(|| format!("{} (line {line} of prompt.json)", path.display()))?;
            pixels.extend(img.into_iter().map(|v| 2.0 * v - 1.0));
            names.push(name.clone());
            count += 1;
        }
        if count > 0 {
            latents.extend(vae.latents(&pixels, count, resolution)?);
        }
    }
    let side = resolution / factor;
    let lc = vae.config().latent_channels;
    let per = lc * side * side;
    let tensors: Vec<(String, Shape, &[f32])> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), Shape::new([lc, side, side]), &latents[i * per..(i + 1) * per]))
        .collect();
    write_atomic(&cache.latents, &host_to_safetensors(&tensors, meta)?)?;
    eprintln!(
        "cached {} latents ({lc}×{side}×{side}) and {} text embeddings in {} ({:.1} s)",
        names.len(),
        prompts.len(),
        cache_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(cache)
}
