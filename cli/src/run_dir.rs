//! A run's output folder: created if missing, locked while a run writes into it (an
//! operating-system lock on `.lisa.lock`, released by the system when the process ends, so a
//! killed run never blocks the next), and its checkpoints owned by the run that wrote them
//! (the run id in their `state.json`): pruning touches only the current run's, and a new run
//! refuses a folder that holds another run's outputs unless told to resume or to overwrite.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_trainer::checkpoint::list_checkpoints;

/// The lock file's name.
pub const LOCK: &str = ".lisa.lock";

/// An output folder held by this process (for as long as this value lives).
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates `path` if needed and takes its lock (also the proof that it is writable).
    pub fn lock(path: &Path) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("cannot create the output folder {}", path.display()))?;
        let lock = path.join(LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .with_context(|| format!("cannot write in the output folder {}", path.display()))?;
        if let Err(e) = file.try_lock() {
            let owner = fs::read_to_string(&lock).unwrap_or_default();
            return match e {
                fs::TryLockError::WouldBlock => bail!(
                    "{} is in use by another lisa run (process {}); wait for it or choose another --output-dir",
                    path.display(),
                    owner.trim()
                ),
                fs::TryLockError::Error(e) => Err(e).with_context(|| format!("cannot lock {}", lock.display())),
            };
        }
        file.set_len(0)
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write in the output folder {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), _lock: file })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint `--resume-from-checkpoint` names: a folder, or `latest` (the newest here).
    pub fn resume_target(&self, named: &str) -> Result<PathBuf> {
        let dir = if named == "latest" {
            list_checkpoints(&self.path).pop().map(|c| c.1).ok_or_else(|| {
                anyhow::anyhow!("--resume-from-checkpoint latest: no checkpoint-* in {}", self.path.display())
            })?
        } else {
            PathBuf::from(named)
        };
        if !dir.is_dir() {
            bail!("--resume-from-checkpoint: {} does not exist", dir.display());
        }
        Ok(dir)
    }

    /// Refuses to let run `run_id` write here while another run's checkpoints or `outputs`
    /// are present; with `overwrite` (the user's explicit word), removes them instead.
    pub fn refuse_others(&self, run_id: &str, outputs: &[PathBuf], overwrite: bool) -> Result<()> {
        let foreign: Vec<PathBuf> = list_checkpoints(&self.path)
            .into_iter()
            .filter(|c| c.2.as_deref() != Some(run_id))
            .map(|c| c.1)
            .chain(outputs.iter().filter(|p| p.exists()).cloned())
            .collect();
        let Some(first) = foreign.first() else { return Ok(()) };
        if !overwrite {
            bail!(
                "{} holds another run's outputs ({}); resume that run with --resume-from-checkpoint, start over with --overwrite (which deletes them), or choose another --output-dir",
                self.path.display(),
                first.display()
            );
        }
        for p in &foreign {
            let removed = if p.is_dir() { fs::remove_dir_all(p) } else { fs::remove_file(p) };
            removed.with_context(|| format!("cannot remove {}", p.display()))?;
        }
        Ok(())
    }

    /// Removes `run_id`'s oldest checkpoints so that at most `limit` of them remain; other
    /// runs' checkpoints are never touched.
    pub fn prune(&self, run_id: &str, limit: usize) -> Result<()> {
        let own: Vec<_> = list_checkpoints(&self.path).into_iter().filter(|c| c.2.as_deref() == Some(run_id)).collect();
        for (_, old, _) in own.iter().take(own.len().saturating_sub(limit.max(1))) {
            fs::remove_dir_all(old).with_context(|| format!("cannot remove {}", old.display()))?;
        }
        Ok(())
    }
}

/// The checkpoint flags `lisa train` and `lisa pretrain` share.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpointing_steps: u64,
    /// Keep at most N of this run's checkpoints (oldest removed first; other runs' are kept).
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// A checkpoint directory, or "latest" (the newest in --output-dir).
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Start a new run in an --output-dir that holds another run's outputs, deleting its
    /// checkpoints and metrics.jsonl there.
    #[arg(long, conflicts_with = "resume_from_checkpoint")]
    pub overwrite: bool,
}

impl CheckpointArgs {
    /// Whether step `step` of `total` saves a checkpoint.
    pub fn saves_at(&self, step: u64, total: u64) -> bool {
        (self.checkpointing_steps > 0 && step.is_multiple_of(self.checkpointing_steps)) || step == total
    }
}
