//! `--train-shards 'DIR/{00000..00099}.tar'`: webdataset tar shards. A sample is the run of
//! consecutive entries sharing a key (the file name up to its first dot, with its folder), its
//! parts named by the rest (`0001.jpg`, `0001.cond.png`, `0001.txt`). Which parts are the
//! image, the condition and the caption: `--image-column`, `--conditioning-image-column`,
//! `--caption-column` (extensions here; by default the first of jpg / jpeg / png, of
//! conditioning.png / conditioning.jpg / cond.png / cond.jpg / hint.png / hint.jpg, and txt).
//!
//! The shards are indexed once, one entry at a time: the cache gets a `prompt.json` whose
//! images are references into the shards (`SHARD#OFFSET+SIZE`), read in place whenever an
//! image is needed, never copied out. Memory holds one caption at a time and the index; the
//! trainer draws the examples in its own seeded order (a full shuffle, not a buffer), so a
//! resume continues exactly.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::converted_dataset::{Columns, converted, files_key};

/// The image parts tried in order when `--image-column` is not given.
const IMAGE_PARTS: &[&str] = &["jpg", "jpeg", "png"];
/// The condition parts tried in order when `--conditioning-image-column` is not given.
const CONDITION_PARTS: &[&str] =
    &["conditioning.png", "conditioning.jpg", "cond.png", "cond.jpg", "hint.png", "hint.jpg"];
/// The most bytes a caption may hold.
const MAX_TEXT_BYTES: u64 = 1 << 20;

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

/// One part of a sample: its name after the key's dot, where its bytes lie in the shard, and
/// its first bytes (a caption's all).
struct Part {
    name: String,
    offset: u64,
    size: u64,
    head: Vec<u8>,
}

/// A sample being read: its key and its parts.
type Sample = (String, Vec<Part>);

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
            let shard = std::fs::canonicalize(shard).with_context(|| format!("reading {}", shard.display()))?;
            let mut sample: Option<Sample> = None;
            let mut finish = |sample: Option<Sample>| -> Result<()> {
                match sample {
                    Some((key, parts)) => {
                        let outcome = add(w, &shard, &key, &parts, columns);
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
                // Where the part's bytes lie in the shard, and what they start with (images)
                // or all of them (a caption, at most MAX_TEXT_BYTES).
                let (offset, size) = (entry.raw_file_position(), entry.size());
                let mut head = Vec::new();
                let wanted = if part.ends_with("txt") { MAX_TEXT_BYTES + 1 } else { 16 };
                (&mut entry)
                    .take(wanted)
                    .read_to_end(&mut head)
                    .with_context(|| format!("{}: reading {name}", shard.display()))?;
                let found = Part { name: part.to_string(), offset, size, head };
                match &mut sample {
                    Some((k, parts)) if *k == key => parts.push(found),
                    _ => {
                        finish(sample.take())?;
                        sample = Some((key, vec![found]));
                    }
                }
            }
            finish(sample.take())?;
        }
        Ok(())
    })
}

/// Adds the sample `key` of `shard` (its `parts`) to the index.
fn add(
    w: &mut crate::converted_dataset::Fill50kWriter,
    shard: &Path,
    key: &str,
    parts: &[Part],
    columns: &Columns,
) -> Result<()> {
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    let at = |flag: &str| format!("{}: sample {key:?} (parts {})", shard.display(), names.join(", ")) + flag;
    let find = |given: &Option<String>, defaults: &[&str], flag: &str| -> Result<&Part> {
        let wanted: Vec<&str> = match given {
            Some(g) => vec![g.as_str()],
            None => defaults.to_vec(),
        };
        wanted
            .iter()
            .find_map(|want| parts.iter().find(|p| p.name == *want))
            .with_context(|| format!("{}: no {} part ({flag})", at(""), wanted.join(" / ")))
    };
    let image = find(&columns.image, IMAGE_PARTS, "--image-column")?;
    let condition = find(&columns.conditioning, CONDITION_PARTS, "--conditioning-image-column")?;
    let caption = find(&columns.caption, &["txt"], "--caption-column")?;
    if caption.size > MAX_TEXT_BYTES {
        bail!("{}: the caption holds {} bytes (at most {MAX_TEXT_BYTES})", at(""), caption.size);
    }
    let prompt = std::str::from_utf8(&caption.head)
        .map_err(|_| anyhow::anyhow!("{}: the caption is not UTF-8 text", at("")))?
        .trim()
        .to_string();
    let at = |column: &str| at(&format!(", the {column} part"));
    w.check(&image.head, &condition.head, &at)?;
    let reference = |p: &Part| crate::image::member_reference(shard, p.offset, p.size);
    w.add_refs(&reference(image), &reference(condition), &prompt);
    Ok(())
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
