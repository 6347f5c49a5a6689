//! The checkpoint flags `lisa train` and `lisa pretrain` share. The output folder itself (its
//! lock, run-owned checkpoints, pruning, resuming) is the library's
//! `lisa_trainer::session::OutputDir`.

use lisa_trainer::session::{CheckpointPolicy, ResumeFrom, Rollback};

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
    pub resume_from_checkpoint: Option<ResumeFrom>,
    /// What a resume from an older checkpoint does with this run's later checkpoints (the
    /// abandoned branch): move-aside (into `OUTPUT_DIR/abandoned-<time>/`) or delete.
    #[arg(long, default_value = "move-aside")]
    pub rollback: Rollback,
    /// Start a new run in an --output-dir that holds another run's outputs, deleting its
    /// checkpoints and metrics.jsonl there.
    #[arg(long, conflicts_with = "resume_from_checkpoint")]
    pub overwrite: bool,
}

impl CheckpointArgs {
    /// When to save and how many to keep.
    pub fn policy(&self) -> CheckpointPolicy {
        CheckpointPolicy { every: self.checkpointing_steps, total_limit: self.checkpoints_total_limit }
    }
}
