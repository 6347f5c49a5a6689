//! `--dataset-name DIR`: a Hugging Face `datasets` dataset as users keep it, read through the
//! `arrow` and `parquet` crates: a `save_to_disk` folder (Arrow IPC streams listed in
//! `state.json`; a `DatasetDict`'s `train` split), a folder of Parquet files as the Hub stores
//! them (`data/train-*.parquet`; other splits left out), or one `.parquet` / `.arrow` file.
//! Columns as train_controlnet.py names them (`--image-column`, `--conditioning-image-column`,
//! `--caption-column`; by default the first, third and second column, as it takes them).
//!
//! The rows are written once, batch by batch (bounded memory), into the Fill50K layout in the
//! cache (`source/`, `target/` with the images' own bytes, `prompt.json`), where everything
//! lisa does with a data folder applies: the latent cache, the checks, exact resume. The
//! folder is named by a digest of the input files (names, sizes, times) and the columns, so a
//! second run reuses it and another dataset gets its own. A bad row (a null, an image that is
//! neither PNG nor JPEG, a missing file) is named by file, row and column before training.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::converted_dataset::{Columns, Fill50kWriter, converted, files_key};

/// Rows per Parquet batch (the images of one batch are in memory at once).
const PARQUET_BATCH: usize = 64;

/// One table file of the dataset.
#[derive(Debug, Clone)]
enum Table {
    Arrow(PathBuf),
    Parquet(PathBuf),
}

impl Table {
    fn path(&self) -> &Path {
        match self {
            Table::Arrow(p) | Table::Parquet(p) => p,
        }
    }

    /// Its record batches, one at a time.
    fn batches(&self) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>>>> {
        let path = self.path().to_path_buf();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(match self {
            Table::Arrow(_) => {
                let reader = StreamReader::try_new(std::io::BufReader::new(file), None)
                    .map_err(|e| anyhow::anyhow!("{}: not an Arrow IPC stream ({e})", path.display()))?;
                Box::new(reader.map(move |b| b.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))))
            }
            Table::Parquet(_) => {
                let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| anyhow::anyhow!("{}: not a Parquet file lisa reads ({e})", path.display()))?
                    .with_batch_size(PARQUET_BATCH)
                    .build()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                Box::new(reader.map(move |b| b.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))))
            }
        })
    }
}

/// The table files of the dataset at `dir`, in row order.
fn tables(dir: &Path) -> Result<Vec<Table>> {
    let kind = |p: &Path| match p.extension().and_then(|e| e.to_str()) {
        Some("arrow") => Some(Table::Arrow(p.to_path_buf())),
        Some("parquet") => Some(Table::Parquet(p.to_path_buf())),
        _ => None,
    };
    if dir.is_file() {
        return kind(dir).map(|t| vec![t]).with_context(|| {
            format!("--dataset-name {}: a file must be .parquet or .arrow (Arrow IPC stream)", dir.display())
        });
    }
    if !dir.is_dir() {
        bail!("--dataset-name {}: no such folder or file", dir.display());
    }
    // A DatasetDict's save_to_disk: its splits are folders; training reads `train`.
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let text = std::fs::read_to_string(&dict).with_context(|| format!("reading {}", dict.display()))?;
        let splits: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", dict.display()))?;
        let names: Vec<&str> =
            splits["splits"].as_array().map(|s| s.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        if !names.contains(&"train") {
            bail!("{}: no train split (splits: {})", dict.display(), names.join(", "));
        }
        return tables(&dir.join("train"));
    }
    // A Dataset's save_to_disk: state.json lists its Arrow files in order.
    let state = dir.join("state.json");
    if state.is_file() {
        let text = std::fs::read_to_string(&state).with_context(|| format!("reading {}", state.display()))?;
        let state_json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", state.display()))?;
        let files: Vec<Table> = state_json["_data_files"]
            .as_array()
            .map(|f| f.iter().filter_map(|f| f["filename"].as_str()).map(|n| Table::Arrow(dir.join(n))).collect())
            .unwrap_or_default();
        if files.is_empty() {
            bail!("{}: lists no _data_files", state.display());
        }
        return Ok(files);
    }
    // Parquet (or Arrow) files anywhere below, as the Hub stores them; with split-named files
    // (`train-00000-of-00002.parquet`), the train split's only.
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?.flatten() {
            let p = entry.path();
            if p.is_dir() && !entry.file_name().to_string_lossy().starts_with('.') {
                stack.push(p);
            } else if kind(&p).is_some() {
                found.push(p);
            }
        }
    }
    found.sort();
    // Split-named files (`train-00000-of-00002.parquet`, `fill50k-test.arrow`,
    // `default/train/0000.parquet`): the train split's only; split names without a train
    // split are refused, not mixed into training.
    let splits: Vec<Option<&'static str>> = found.iter().map(|p| split_of(p.strip_prefix(dir).unwrap_or(p))).collect();
    if splits.iter().any(Option::is_some) {
        if !splits.contains(&Some("train")) {
            let mut named: Vec<&str> = splits.iter().flatten().copied().collect();
            named.dedup();
            bail!("--dataset-name {}: its files are split into {} and none is train", dir.display(), named.join(", "));
        }
        found = found.into_iter().zip(&splits).filter(|(_, s)| **s == Some("train")).map(|(p, _)| p).collect();
    }
    if found.is_empty() {
        bail!(
            "--dataset-name {}: no dataset here (a save_to_disk folder with state.json, or .parquet / .arrow files)",
            dir.display()
        );
    }
    Ok(found.iter().filter_map(|p| kind(p)).collect())
}

/// The split a dataset file belongs to by its path: a folder named after the split, or the
/// split's name as a `-`, `_` or `.` delimited token of the file name.
fn split_of(relative: &Path) -> Option<&'static str> {
    const SPLITS: [&str; 5] = ["train", "test", "validation", "valid", "dev"];
    let mut tokens: Vec<String> = Vec::new();
    for part in relative.iter().filter_map(|c| c.to_str()) {
        tokens.extend(part.split(['-', '_', '.']).map(str::to_lowercase));
    }
    SPLITS.into_iter().find(|s| tokens.iter().any(|t| t == s))
}

/// The three columns' names, checked against the first table's schema (each must exist and be
/// of a type lisa reads) before any row is written.
fn resolve(first: &RecordBatch, given: &Columns, file: &Path) -> Result<[String; 3]> {
    let schema = first.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let pick = |given: &Option<String>, at: usize, flag: &str| -> Result<String> {
        let name = match given {
            Some(n) => n.clone(),
            None => names.get(at).map(|n| n.to_string()).with_context(|| {
                format!(
                    "{}: {flag} not given and the table has no column {} (columns: {})",
                    file.display(),
                    at + 1,
                    names.join(", ")
                )
            })?,
        };
        if !names.contains(&name.as_str()) {
            bail!("{flag} {name:?}: {} has no such column (columns: {})", file.display(), names.join(", "));
        }
        Ok(name)
    };
    let cols = [
        pick(&given.image, 0, "--image-column")?,
        pick(&given.conditioning, 2, "--conditioning-image-column")?,
        pick(&given.caption, 1, "--caption-column")?,
    ];
    for (name, image) in [(&cols[0], true), (&cols[1], true), (&cols[2], false)] {
        let t = first.column_by_name(name).expect("checked above").data_type();
        let problem = match (image, t) {
            (true, _) if image_type(t) => continue,
            (false, _) if text_type(t) => continue,
            (true, DataType::Struct(_)) => {
                "a struct image column needs fields bytes and path (datasets' Image feature)".to_string()
            }
            (true, _) => format!("type {t} is no image (bytes, a path, or datasets' Image struct)"),
            (false, _) => format!("type {t} is no text (a string, or a list of strings)"),
        };
        bail!("{}: column {name:?}: {problem}", file.display());
    }
    Ok(cols)
}

/// Whether a column of type `t` holds images lisa reads: bytes, a path, or `datasets`' Image
/// struct of both.
fn image_type(t: &DataType) -> bool {
    match t {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::Utf8 | DataType::LargeUtf8 => true,
        DataType::Struct(fields) => {
            ["bytes", "path"].iter().all(|n| fields.iter().any(|f| f.name() == n && image_type(f.data_type())))
        }
        _ => false,
    }
}

/// Whether a column of type `t` holds captions lisa reads: strings, or lists of them.
fn text_type(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::List(item) => text_type(item.data_type()),
        _ => false,
    }
}

/// An image cell: its bytes, or a path to them.
enum ImageCell {
    Bytes(Vec<u8>),
    Path(String),
}

/// Row `row` of an image column ([`image_type`]; None: null).
fn image_cell(column: &ArrayRef, row: usize) -> std::result::Result<Option<ImageCell>, String> {
    use arrow_array::types::{GenericBinaryType, GenericStringType};
    if column.is_null(row) {
        return Ok(None);
    }
    if let Some(s) = column.as_struct_opt() {
        // datasets' Image feature: {bytes: binary, path: string}; the bytes when given.
        let (Some(bytes), Some(path)) = (s.column_by_name("bytes"), s.column_by_name("path")) else {
            return Err("a struct image column needs fields bytes and path (datasets' Image feature)".into());
        };
        return match image_cell(bytes, row)? {
            Some(b) => Ok(Some(b)),
            None => image_cell(path, row),
        };
    }
    if let Some(b) = column.as_bytes_opt::<GenericBinaryType<i32>>() {
        return Ok(Some(ImageCell::Bytes(b.value(row).to_vec())));
    }
    if let Some(b) = column.as_bytes_opt::<GenericBinaryType<i64>>() {
        return Ok(Some(ImageCell::Bytes(b.value(row).to_vec())));
    }
    if let Some(b) = column.as_binary_view_opt() {
        return Ok(Some(ImageCell::Bytes(b.value(row).to_vec())));
    }
    if let Some(s) = column.as_bytes_opt::<GenericStringType<i32>>() {
        return Ok(Some(ImageCell::Path(s.value(row).to_string())));
    }
    if let Some(s) = column.as_bytes_opt::<GenericStringType<i64>>() {
        return Ok(Some(ImageCell::Path(s.value(row).to_string())));
    }
    Err(format!("type {} is no image (bytes, a path, or datasets' Image struct)", column.data_type()))
}

/// Row `row` of a caption column ([`text_type`]; None: null or an empty list): a string, or
/// the first of a list of strings (train_controlnet.py draws one at random; lisa takes the
/// first, so the data is the same on every run).
fn text_cell(column: &ArrayRef, row: usize) -> std::result::Result<Option<String>, String> {
    use arrow_array::types::GenericStringType;
    if column.is_null(row) {
        return Ok(None);
    }
    if let Some(s) = column.as_bytes_opt::<GenericStringType<i32>>() {
        return Ok(Some(s.value(row).to_string()));
    }
    if let Some(s) = column.as_bytes_opt::<GenericStringType<i64>>() {
        return Ok(Some(s.value(row).to_string()));
    }
    if let Some(s) = column.as_string_view_opt() {
        return Ok(Some(s.value(row).to_string()));
    }
    if let Some(list) = column.as_list_opt::<i32>() {
        let items = list.value(row);
        return if items.is_empty() { Ok(None) } else { text_cell(&items, 0) };
    }
    Err(format!("type {} is no text (a string, or a list of strings)", column.data_type()))
}

/// The dataset at `dir` in the Fill50K layout under `cache/datasets/`, converted now unless an
/// earlier run did: the folder to train on.
pub fn materialize(dir: &Path, columns: &Columns, cache: &Path) -> Result<PathBuf> {
    let tables = tables(dir)?;
    let key = files_key(&tables.iter().map(Table::path).collect::<Vec<_>>(), columns, "datasets")?;
    let base = if dir.is_file() { dir.parent().unwrap_or(Path::new(".")).to_path_buf() } else { dir.to_path_buf() };
    converted(cache, &key, &dir.display().to_string(), columns.skip_bad_rows, |w| convert(&base, &tables, columns, w))
}

/// Writes every row of `tables` through `w`; image paths are relative to `base`.
fn convert(base: &Path, tables: &[Table], given: &Columns, w: &mut Fill50kWriter) -> Result<()> {
    let mut names: Option<[String; 3]> = None;
    for table in tables {
        let file = table.path();
        let mut row_in_file = 0usize;
        for batch in table.batches()? {
            let batch = batch?;
            let cols = match &names {
                Some(c) => c.clone(),
                None => {
                    let c = resolve(&batch, given, file)?;
                    eprintln!(
                        "--dataset-name: images from column {:?}, conditions from {:?}, prompts from {:?}",
                        c[0], c[1], c[2]
                    );
                    names = Some(c.clone());
                    c
                }
            };
            let column = |name: &str| {
                batch.column_by_name(name).with_context(|| format!("{}: no column {name:?}", file.display()))
            };
            let (image, condition, caption) = (column(&cols[0])?, column(&cols[1])?, column(&cols[2])?);
            for r in 0..batch.num_rows() {
                let row = row_in_file + r;
                let named = |column: &str| match column {
                    "image" => cols[0].clone(),
                    "conditioning" => cols[1].clone(),
                    other => other.to_string(),
                };
                let at = |column: &str| format!("{}: row {row}, column {:?}", file.display(), named(column));
                let bytes = |cell: &ArrayRef, column: &str| -> Result<Vec<u8>> {
                    match image_cell(cell, r).map_err(|e| anyhow::anyhow!("{}: {e}", at(column)))? {
                        Some(ImageCell::Bytes(b)) => Ok(b),
                        Some(ImageCell::Path(p)) => {
                            let path = base.join(&p);
                            std::fs::read(&path).with_context(|| format!("{}: reading {}", at(column), path.display()))
                        }
                        None => bail!("{}: no image (null)", at(column)),
                    }
                };
                let mut example = || -> Result<()> {
                    let (target, source) = (bytes(image, "image")?, bytes(condition, "conditioning")?);
                    let prompt = text_cell(caption, r)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", at(&cols[2])))?
                        .with_context(|| format!("{}: no prompt (null)", at(&cols[2])))?;
                    w.check(&target, &source, &at)?;
                    w.add(&target, &source, &prompt, &at)
                };
                let outcome = example();
                w.or_skip(outcome)?;
            }
            row_in_file += batch.num_rows();
        }
    }
    Ok(())
}
