//! A run's output folder: created if missing, locked while a run writes into it (an
//! operating-system lock on [`LOCK`], released by the system when the process ends, so a
//! killed run never blocks the next), and its checkpoints owned by the run that wrote them
//! (the run id in their `state.json`): pruning touches only the current run's, and a new run
//! refuses a folder that holds another run's outputs unless told to resume or to overwrite.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use lisa_core::backend::Backend;

use crate::checkpoint::{RunSettings, list_checkpoints, save_checkpoint};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::run::TrainingRun;

/// The lock file's name.
pub const LOCK: &str = ".lisa.lock";

/// The folder name of checkpoint `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Which checkpoint a run resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest `checkpoint-*` in the output folder.
    Latest,
    /// A checkpoint folder.
    Path(PathBuf),
}

impl std::str::FromStr for ResumeFrom {
    type Err = std::convert::Infallible;

    /// `latest`, or a path.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "latest" { Self::Latest } else { Self::Path(PathBuf::from(s)) })
    }
}

/// An output folder held by this process (for as long as this value lives).
pub struct OutputDir {
    path: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |error| TrainError::Io { path: path.to_path_buf(), error }
}

impl OutputDir {
    /// Creates `path` if needed and takes its lock (also the proof that it is writable).
    pub fn lock(path: &Path) -> Result<Self> {
        let unusable = |what: &str, e: std::io::Error| {
            TrainError::Output(format!("cannot {what} the output folder {}: {e}", path.display()))
        };
        fs::create_dir_all(path).map_err(|e| unusable("create", e))?;
        let lock = path.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(|e| unusable("write in", e))?;
        if let Err(e) = file.try_lock() {
            let owner = fs::read_to_string(&lock).unwrap_or_default();
            return match e {
                fs::TryLockError::WouldBlock => Err(TrainError::Output(format!(
                    "{} is in use by another lisa run (process {}); wait for it or choose another output folder",
                    path.display(),
                    owner.trim()
                ))),
                fs::TryLockError::Error(e) => Err(io(&lock)(e)),
            };
        }
        file.set_len(0).and_then(|_| writeln!(file, "{}", std::process::id())).map_err(|e| unusable("write in", e))?;
        Ok(Self { path: path.to_path_buf(), _lock: file })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint folder `from` names (`Latest`: the newest here), which must exist.
    pub fn resume_target(&self, from: &ResumeFrom) -> Result<PathBuf> {
        resume_target_in(&self.path, from)
    }

    /// Refuses to let run `run_id` write here while another run's checkpoints or `outputs`
    /// are present; with `overwrite` (the user's explicit word), removes them instead. A
    /// `checkpoint-N` folder without a lisa `state.json` is never removed: it is refused.
    pub fn refuse_others(&self, run_id: &str, outputs: &[PathBuf], overwrite: bool) -> Result<()> {
        let checkpoints = list_checkpoints(&self.path);
        if let Some(alien) = checkpoints.iter().find(|c| c.2.is_none()) {
            return Err(TrainError::Output(format!(
                "{} is not a lisa checkpoint (it has no state.json lisa wrote), and lisa never deletes it; move it away or choose another --output-dir",
                alien.1.display()
            )));
        }
        let foreign: Vec<PathBuf> = checkpoints
            .into_iter()
            .filter(|c| c.2.as_deref() != Some(run_id))
            .map(|c| c.1)
            .chain(outputs.iter().filter(|p| p.exists()).cloned())
            .collect();
        let Some(first) = foreign.first() else { return Ok(()) };
        if !overwrite {
            return Err(TrainError::Output(format!(
                "{} holds another run's outputs ({}); resume that run with --resume-from-checkpoint, start over with --overwrite (which deletes them), or choose another --output-dir",
                self.path.display(),
                first.display()
            )));
        }
        for p in &foreign {
            let removed = if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) };
            removed.map_err(io(p))?;
        }
        Ok(())
    }

    /// Saves `run` as checkpoint `step` here, then removes the run's oldest checkpoints beyond
    /// `policy`'s limit. Returns the checkpoint's folder.
    pub fn save<B: Backend, C: RunSettings>(
        &self,
        run: &mut TrainingRun<B, C>,
        data: &dyn Dataset,
        step: u64,
        policy: &CheckpointPolicy,
    ) -> Result<PathBuf> {
        let path = self.path.join(checkpoint_name(step));
        save_checkpoint(run, data, &path)?;
        if let Some(limit) = policy.total_limit {
            self.prune(&run.run_id, limit)?;
        }
        Ok(path)
    }

    /// Removes `run_id`'s oldest checkpoints so that at most `limit` of them remain; other
    /// runs' checkpoints are never touched.
    pub fn prune(&self, run_id: &str, limit: usize) -> Result<()> {
        let own: Vec<_> = list_checkpoints(&self.path).into_iter().filter(|c| c.2.as_deref() == Some(run_id)).collect();
        for (_, old, _) in own.iter().take(own.len().saturating_sub(limit.max(1))) {
            fs::remove_dir_all(old).map_err(io(old))?;
        }
        Ok(())
    }
}

/// What a resume from an older checkpoint does with the same run's checkpoints past it (the
/// abandoned branch), so that `latest` and pruning never mix two branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rollback {
    /// Move them into `abandoned-<time>/` in the output folder (nothing is deleted).
    #[default]
    MoveAside,
    /// Delete them.
    Delete,
}

impl std::str::FromStr for Rollback {
    type Err = TrainError;

    /// `move-aside` | `delete`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "move-aside" => Ok(Self::MoveAside),
            "delete" => Ok(Self::Delete),
            _ => Err(TrainError::Output(format!("{s:?} is not one of move-aside | delete"))),
        }
    }
}

impl OutputDir {
    /// Retires run `run_id`'s checkpoints past `step` (a resume from `step` abandons them) as
    /// `how` says. Returns the checkpoints retired and, when moved, the folder they went to.
    pub fn retire_after(&self, run_id: &str, step: u64, how: Rollback) -> Result<(Vec<PathBuf>, Option<PathBuf>)> {
        let later: Vec<PathBuf> = list_checkpoints(&self.path)
            .into_iter()
            .filter(|c| c.0 > step && c.2.as_deref() == Some(run_id))
            .map(|c| c.1)
            .collect();
        if later.is_empty() {
            return Ok((later, None));
        }
        match how {
            Rollback::Delete => {
                for p in &later {
                    fs::remove_dir_all(p).map_err(io(p))?;
                }
                Ok((later, None))
            }
            Rollback::MoveAside => {
                let time =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let aside = self.path.join(format!("abandoned-{time}"));
                if aside.exists() {
                    return Err(TrainError::Output(format!("{} exists already; try again", aside.display())));
                }
                fs::create_dir(&aside).map_err(io(&aside))?;
                for p in &later {
                    let name = p.file_name().map(PathBuf::from).unwrap_or_default();
                    fs::rename(p, aside.join(name)).map_err(io(p))?;
                }
                Ok((later, Some(aside)))
            }
        }
    }
}

/// When a run saves checkpoints and how many of its own it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpointPolicy {
    /// Save every N steps (0: only at the end).
    pub every: u64,
    /// Keep at most N of this run's checkpoints, oldest removed first (None: all).
    pub total_limit: Option<usize>,
}

impl CheckpointPolicy {
    /// Whether step `step` of `total` saves a checkpoint (always the last).
    pub fn saves_at(&self, step: u64, total: u64) -> bool {
        (self.every > 0 && step.is_multiple_of(self.every)) || step == total
    }
}

/// The checkpoint folder `from` names in the output folder `path` (`Latest`: the newest
/// there), which must exist. Read-only: the other ranks of a data-parallel run resume with it
/// from the folder the first rank locks.
pub(crate) fn resume_target_in(path: &Path, from: &ResumeFrom) -> Result<PathBuf> {
    let dir = match from {
        ResumeFrom::Latest => list_checkpoints(path).pop().map(|c| c.1).ok_or_else(|| {
            TrainError::Output(format!("resume from the latest checkpoint: no checkpoint-* in {}", path.display()))
        })?,
        ResumeFrom::Path(p) => p.clone(),
    };
    if !dir.is_dir() {
        return Err(TrainError::Output(format!("resume: checkpoint {} does not exist", dir.display())));
    }
    Ok(dir)
}
