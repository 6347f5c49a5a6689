//! `--train-shards 'DIR/{00000..00099}.tar'`: webdataset tar shards. A sample is the run of
//! consecutive entries sharing a key (the file name up to its first dot, with its folder), its
//! parts named by the rest (`0001.jpg`, `0001.cond.png`, `0001.txt`). Which parts are the
//! image, the condition and the caption: `--image-column`, `--conditioning-image-column`,
//! `--caption-column` (extensions here; by default the first of jpg / jpeg / png, of
//! conditioning.png / conditioning.jpg / cond.png / cond.jpg / hint.png / hint.jpg, and txt).
//!
//! The shards are read one entry at a time (one sample in memory) and converted once into the
//! Fill50K layout in the cache, as `--dataset-name` is; the trainer then draws the examples in
//! its own seeded order, so a resume continues exactly.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::hf_dataset::{Columns, converted, files_key};

/// The image parts tried in order when `--image-column` is not given.
const IMAGE_PARTS: &[&str] = &["jpg", "jpeg", "png"];
/// The condition parts tried in order when `--conditioning-image-column` is not given.
const CONDITION_PARTS: &[&str] =
    &["conditioning.png", "conditioning.jpg", "cond.png", "cond.jpg", "hint.png", "hint.jpg"];
/// The most bytes one part may hold (a guard against a corrupt header asking for gigabytes).
const MAX_PART_BYTES: u64 = 256 << 20;

/// `{a..b}` ranges (zero-padded to `a`'s width, as webdataset's braceexpand) and `{x,y}`
/// lists, expanded left to right.
pub fn expand(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else { return Ok(vec![pattern.to_string()]) };
    let close = pattern[open..].find('}').map(|c| open + c).with_context(|| format!("{pattern:?}: a {{ without }}"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let items: Vec<String> = match body.split_once("..") {
        Some((a, b)) => {
            let range = |v: &str| v.parse::<u64>().with_context(|| format!("{pattern:?}: {v:?} is not a number"));
            let (from, to) = (range(a)?, range(b)?);
            if to < from || to - from >= 1_000_000 {
                bail!("{pattern:?}: the range {from}..{to} is empty or too long");
            }
            (from..=to).map(|i| format!("{i:0width$}", width = a.len())).collect()
        }
        None => body.split(',').map(String::from).collect(),
    };
    let mut out = Vec::new();
    for item in items {
        out.extend(expand(&format!("{head}{item}{tail}"))?);
    }
    Ok(out)
}

/// A sample being read: its key and its parts (name after the key's dot, bytes).
type Sample = (String, Vec<(String, Vec<u8>)>);

/// The shard files of `pattern`, each checked to exist.
fn shards(pattern: &str) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = expand(pattern)?.into_iter().map(PathBuf::from).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        bail!("--train-shards {pattern:?}: {} is not a file ({} shard(s) named)", missing.display(), files.len());
    }
    Ok(files)
}

/// The shards of `pattern` in the Fill50K layout under `cache/datasets/`, converted now unless
/// an earlier run did: the folder to train on.
pub fn materialize(pattern: &str, columns: &Columns, cache: &Path) -> Result<PathBuf> {
    let files = shards(pattern)?;
    let key = files_key(&files.iter().map(PathBuf::as_path).collect::<Vec<_>>(), columns, "webdataset")?;
    converted(cache, &key, pattern, columns.skip_bad_rows, |w| {
        for shard in &files {
            let file = std::fs::File::open(shard).with_context(|| format!("opening {}", shard.display()))?;
            let mut archive = tar::Archive::new(std::io::BufReader::new(file));
            let mut sample: Option<Sample> = None;
            let mut finish = |sample: Option<Sample>| -> Result<()> {
                match sample {
                    Some((key, parts)) => {
                        let outcome = add(w, shard, &key, &parts, columns);
                        w.or_skip(outcome)
                    }
                    None => Ok(()),
                }
            };
            let entries = archive.entries().with_context(|| format!("{}: not a tar file", shard.display()))?;
            for entry in entries {
                let mut entry = entry.with_context(|| format!("{}: a damaged tar entry", shard.display()))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = entry.path().with_context(|| format!("{}: an entry's name", shard.display()))?;
                let name = name.to_string_lossy().into_owned();
                let (folder, file_name) = name.rsplit_once('/').map_or(("", name.as_str()), |(d, f)| (d, f));
                let Some((stem, part)) = file_name.split_once('.') else { continue };
                let key = if folder.is_empty() { stem.to_string() } else { format!("{folder}/{stem}") };
                if entry.size() > MAX_PART_BYTES {
                    bail!("{}: sample {key:?}: part {part:?} holds {} bytes", shard.display(), entry.size());
                }
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut bytes).with_context(|| format!("{}: reading {name}", shard.display()))?;
                match &mut sample {
                    Some((k, parts)) if *k == key => parts.push((part.to_string(), bytes)),
                    _ => {
                        finish(sample.take())?;
                        sample = Some((key, vec![(part.to_string(), bytes)]));
                    }
                }
            }
            finish(sample.take())?;
        }
        Ok(())
    })
}

/// Adds the sample `key` of `shard` (its `parts`) to the converted folder.
fn add(
    w: &mut crate::hf_dataset::Fill50kWriter,
    shard: &Path,
    key: &str,
    parts: &[(String, Vec<u8>)],
    columns: &Columns,
) -> Result<()> {
    let names: Vec<&str> = parts.iter().map(|(p, _)| p.as_str()).collect();
    let at = |flag: &str| format!("{}: sample {key:?} (parts {})", shard.display(), names.join(", ")) + flag;
    let find = |given: &Option<String>, defaults: &[&str], flag: &str| -> Result<&[u8]> {
        let wanted: Vec<&str> = match given {
            Some(g) => vec![g.as_str()],
            None => defaults.to_vec(),
        };
        wanted
            .iter()
            .find_map(|want| parts.iter().find(|(p, _)| p == want).map(|(_, b)| b.as_slice()))
            .with_context(|| format!("{}: no {} part ({flag})", at(""), wanted.join(" / ")))
    };
    let image = find(&columns.image, IMAGE_PARTS, "--image-column")?;
    let condition = find(&columns.conditioning, CONDITION_PARTS, "--conditioning-image-column")?;
    let caption = find(&columns.caption, &["txt"], "--caption-column")?;
    let prompt = std::str::from_utf8(caption)
        .map_err(|_| anyhow::anyhow!("{}: the caption is not UTF-8 text", at("")))?
        .trim()
        .to_string();
    let at = |column: &str| at(&format!(", the {column} part"));
    w.check(image, condition, &at)?;
    w.add(image, condition, &prompt, &at)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn braces_expand_as_webdataset_does() {
        assert_eq!(expand("a/{000..002}.tar").unwrap(), ["a/000.tar", "a/001.tar", "a/002.tar"]);
        assert_eq!(expand("{x,y}-{8..10}").unwrap(), ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]);
        assert_eq!(expand("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand("a/{3..1}.tar").is_err() && expand("a/{1..x}.tar").is_err() && expand("a/{1..2.tar").is_err());
    }
}
