//! `metrics.jsonl`: one JSON object per line, appended as the run goes (one per step, and
//! one for a validation before the first step), each flushed to the file as written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::weights::write_atomic;

/// The metrics file's name in a run's output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A run's metrics file, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// The run id, until the first row has carried it.
    run_id: Option<String>,
}

impl MetricsLog {
    /// Opens (creating if missing) `path` for appending the rows of run `run_id`.
    pub fn append(path: &Path, run_id: &str) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| TrainError::Io { path: path.to_path_buf(), error })?;
        Ok(Self { path: path.to_path_buf(), file, run_id: Some(run_id.to_string()) })
    }

    /// Appends one row. The first row this log writes also names the run (`run`), so that a
    /// resume can tell this run's metrics from another's ([`MetricsLog::keep_until`]).
    pub fn write(&mut self, mut row: serde_json::Map<String, serde_json::Value>) -> Result<()> {
        if let Some(id) = self.run_id.take() {
            row.insert("run".into(), id.into());
        }
        let row = serde_json::Value::Object(row);
        writeln!(self.file, "{row}").map_err(|error| TrainError::Io { path: self.path.clone(), error })
    }

    /// Whether `path` records no training: empty, or only JSON rows without a step past 0 (a
    /// run stopped before its first step leaves such a file; nothing in it is worth keeping).
    /// Any other line (not a row of lisa's) counts as content.
    pub fn records_no_training(path: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(path) else { return false };
        text.lines().filter(|l| !l.trim().is_empty()).all(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v.is_object() && v.get("step").and_then(|s| s.as_u64()).is_none_or(|s| s == 0))
        })
    }

    /// Drops the lines of `path` past `step` (a resumed run writes them again); a file with
    /// another run's lines (their `run` field: the first row each process writes has one) is
    /// refused, not cut. A missing file is fine.
    pub fn keep_until(path: &Path, run_id: &str, step: u64) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
        let rows: Vec<Option<serde_json::Value>> = text.lines().map(|l| serde_json::from_str(l).ok()).collect();
        let other = rows.iter().flatten().any(|v| v.get("run").and_then(|r| r.as_str()).is_some_and(|r| r != run_id));
        if other {
            return Err(TrainError::Output(format!(
                "{} holds another run's metrics; resume a run in its own output folder",
                path.display()
            )));
        }
        let kept: String = text
            .lines()
            .zip(&rows)
            .filter(|(_, v)| v.as_ref().and_then(|v| v.get("step")?.as_u64()).is_some_and(|s| s <= step))
            .map(|(l, _)| format!("{l}\n"))
            .collect();
        write_atomic(path, kept.as_bytes())
    }
}
