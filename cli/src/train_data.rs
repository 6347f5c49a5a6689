//! Where `lisa train` reads its examples: a data folder as given, or a dataset
//! (`--dataset-name`, `--train-shards`) converted into one on first use. The conversion can
//! take long on a large set, so the model paths ask for the folder only after their cheap
//! checks (configs, flags, memory): a wrong flag is an error in a second, not after it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::converted_dataset::Columns;

/// The examples of a training run.
pub enum TrainData {
    /// A folder (`--train-data-dir` or the run file's `[data] dir`), or none (procedural data).
    Folder(Option<PathBuf>),
    /// A dataset to convert into the cache.
    Dataset { source: Source, columns: Columns, cache: PathBuf },
}

/// A dataset lisa converts.
pub enum Source {
    /// `--dataset-name`: Hugging Face `datasets` files.
    HuggingFace(PathBuf),
    /// `--train-shards`: webdataset tar shards (a brace pattern).
    Shards(String),
}

impl TrainData {
    /// The examples the flags name: `dataset` or `shards` (converted into `cache`), else
    /// `folder`. The column flags apply to a dataset only.
    pub fn new(
        folder: Option<PathBuf>,
        dataset: Option<&Path>,
        shards: Option<&str>,
        columns: Columns,
        cache: PathBuf,
    ) -> Result<Self> {
        let source = match (dataset, shards) {
            (Some(dataset), _) => Source::HuggingFace(dataset.to_path_buf()),
            (None, Some(shards)) => Source::Shards(shards.to_string()),
            (None, None) => {
                if columns.image.is_some()
                    || columns.conditioning.is_some()
                    || columns.caption.is_some()
                    || columns.skip_bad_rows
                {
                    bail!(
                        "--image-column, --conditioning-image-column, --caption-column and --skip-bad-rows are for --dataset-name or --train-shards"
                    );
                }
                return Ok(Self::Folder(folder));
            }
        };
        Ok(Self::Dataset { source, columns, cache })
    }

    /// Whether any examples were named (a folder or a dataset).
    pub fn is_given(&self) -> bool {
        !matches!(self, Self::Folder(None))
    }

    /// The folder to train on, the dataset converted into the cache now (reused when an
    /// earlier run converted the same input). A run asks once, after its cheap checks.
    pub fn folder(&self) -> Result<Option<PathBuf>> {
        match self {
            Self::Folder(folder) => Ok(folder.clone()),
            Self::Dataset { source: Source::HuggingFace(dataset), columns, cache } => {
                crate::hf_dataset::materialize(dataset, columns, cache).map(Some)
            }
            Self::Dataset { source: Source::Shards(pattern), columns, cache } => {
                crate::webdataset::materialize(pattern, columns, cache).map(Some)
            }
        }
    }

    /// The folder of a run that needs one (the diffusers pipelines), converted now if it is
    /// a dataset, and recorded as the run's data folder `dir`.
    pub fn required_folder(&self, dir: &mut Option<PathBuf>) -> Result<PathBuf> {
        let folder = self
            .folder()?
            .context("--pretrained-model-name-or-path needs --train-data-dir (or --dataset-name, --train-shards)")?;
        *dir = Some(folder.clone());
        Ok(folder)
    }
}
