//! A run's output folder: created if missing, locked while a run writes into it (a second
//! run is refused, a lock left by a dead process is taken over), and its checkpoints owned by
//! the run that wrote them (the run id in their `state.json`): pruning touches only the
//! current run's, and a new run refuses a folder that holds another run's unless told to
//! resume or to overwrite.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lisa_trainer::checkpoint::list_checkpoints;

/// The lock file's name.
const LOCK: &str = ".lisa.lock";

/// An output folder held by this process.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `path` if needed and takes its lock (also the proof that it is writable).
    pub fn lock(path: &Path) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("cannot create the output folder {}", path.display()))?;
        let lock = path.join(LOCK);
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())
                        .with_context(|| format!("cannot write in the output folder {}", path.display()))?;
                    return Ok(Self { path: path.to_path_buf() });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = fs::read_to_string(&lock).ok().and_then(|s| s.trim().parse::<u32>().ok());
                    match owner {
                        Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => bail!(
                            "{} is in use by another lisa run (process {pid}); wait for it or choose another --output-dir",
                            path.display()
                        ),
                        // A lock left by a process that is gone: take it over.
                        _ => fs::remove_file(&lock)
                            .with_context(|| format!("cannot remove the stale lock {}", lock.display()))?,
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot write in the output folder {}", path.display()));
                }
            }
        }
        bail!("cannot take the lock of {}", path.display())
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

    /// Refuses a new run (`run_id`) here while another run's checkpoints or `outputs` are
    /// present, unless `overwrite`.
    pub fn refuse_others(&self, run_id: &str, outputs: &[PathBuf], overwrite: bool) -> Result<()> {
        let foreign = list_checkpoints(&self.path).into_iter().find(|c| c.2.as_deref() != Some(run_id)).map(|c| c.1);
        if let Some(other) = foreign.or_else(|| outputs.iter().find(|p| p.exists()).cloned())
            && !overwrite
        {
            bail!(
                "{} holds another run's outputs ({}); resume it with --resume-from-checkpoint, start over with --overwrite, or choose another --output-dir",
                self.path.display(),
                other.display()
            );
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

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.path.join(LOCK));
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
    /// Start a new run in an --output-dir that holds another run's outputs (its metrics are
    /// replaced, its checkpoints kept but for those this run rewrites).
    #[arg(long, conflicts_with = "resume_from_checkpoint")]
    pub overwrite: bool,
}

impl CheckpointArgs {
    /// Whether step `step` of `total` saves a checkpoint.
    pub fn saves_at(&self, step: u64, total: u64) -> bool {
        (self.checkpointing_steps > 0 && step.is_multiple_of(self.checkpointing_steps)) || step == total
    }
}
