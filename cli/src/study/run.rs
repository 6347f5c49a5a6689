//! Running one arm of the grid for one seed: skipped when done, resumed from its latest
//! checkpoint when started, refused when its settings changed.

use std::path::Path;

use anyhow::{Context, Result, bail};
use lisa_core::backend::Backend;
use lisa_trainer::differences::listed;
use lisa_trainer::session::{ResumeFrom, Rollback};
use lisa_trainer::weights::write_atomic;

use super::plan::{KeptRunFile, PlannedRun, StudyFile};
use crate::arm::{LoopOptions, Start, train_arm};
use crate::run_dir::CheckpointArgs;

/// The resolved run file of a run, kept to detect a changed configuration on resume.
const RUN_FILE: &str = "run.toml";
/// Written when a run has finished.
pub(super) const DONE: &str = "done.json";

/// Trains one run unless it is done; resumes it from its latest checkpoint if it started. A
/// run made with other settings than the study file's now (the prior's contents, any key) is
/// refused with the differences named, finished or not; one whose only change is more steps
/// continues from its last checkpoint.
pub(super) fn run_one<B: Backend>(run: &PlannedRun, study: &StudyFile, out: &Path, device: B::Device) -> Result<()> {
    let dir = run.dir(out);
    let kept = dir.join(RUN_FILE);
    if kept.is_file() {
        let text = std::fs::read_to_string(&kept).with_context(|| format!("cannot read {}", kept.display()))?;
        let before = KeptRunFile::parse(&text).with_context(|| format!("{} is damaged", kept.display()))?;
        let now = KeptRunFile::parse(&run.run_file)?;
        let changed = before.differences(&now)?;
        let steps = |k: &KeptRunFile| k.settings.get("train")?.get("max_train_steps")?.as_integer();
        let longer = changed.len() == 1
            && changed[0].starts_with("train.max_train_steps:")
            && steps(&now).unwrap_or(0) > steps(&before).unwrap_or(i64::MAX);
        if longer {
            eprintln!(
                "{}: {}; continuing from its last checkpoint",
                dir.display(),
                changed[0].replace("train.max_train_steps", "steps")
            );
            write_atomic(&kept, run.run_file.as_bytes())?;
            if dir.join(DONE).is_file() {
                std::fs::remove_file(dir.join(DONE))
                    .with_context(|| format!("cannot remove {}", dir.join(DONE).display()))?;
            }
        } else if !changed.is_empty() {
            bail!(
                "the settings of arm {:?} changed since {} ran (then vs now: {}); restore them, remove that run's folder to run it again, or use another --output-dir",
                run.arm,
                dir.display(),
                listed(&changed, 6)
            );
        }
    }
    if dir.join(DONE).is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !kept.is_file() {
        write_atomic(&kept, run.run_file.as_bytes())?;
    }
    let has_checkpoint = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"));
    let label = format!("{}/{}", run.arm, run.seed);
    let options = LoopOptions {
        latent_validation: None,
        tensorboard: None,
        validation_samples: 1,
        control_metric: crate::control_score::ControlMetric::None,
        output_dir: &dir,
        validation_steps: study.validation_steps,
        validate_at_start: true,
        checkpoints: CheckpointArgs {
            checkpointing_steps: study.checkpointing_steps.unwrap_or(study.validation_steps),
            // Two, so that a run killed while writing one still has the one before.
            checkpoints_total_limit: Some(2),
            resume_from_checkpoint: has_checkpoint.then_some(ResumeFrom::Latest),
            // A run that started here and stopped before its first checkpoint starts over:
            // its metrics are the study's own.
            rollback: Rollback::MoveAside,
            overwrite: !has_checkpoint,
        },
        label: &label,
    };
    train_arm::<B>(&run.file, Start::Files { main: &run.main, side: None }, device, &options)?;
    let done = serde_json::json!({"arm": run.arm, "seed": run.seed, "backend": B::name()});
    write_atomic(&dir.join(DONE), serde_json::to_string_pretty(&done)?.as_bytes())?;
    Ok(())
}
