//! The training run: what a program embedding `lisa-trainer` calls to train a side network
//! the way `lisa train` does. [`run`] owns the cadence (steps, validations, checkpoints), the
//! metrics rows (`metrics.jsonl`), checkpoint save, prune and resume in an output folder it
//! locks ([`OutputDir`]), and reports its progress as [`Event`]s to an [`Observer`]; what it
//! validates with is a [`Validator`]. A program keeps what touches its user: flags, progress
//! bars, image files (the observer receives each validation grid as RGB pixels).

mod metrics;
mod output;
mod validator;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use metrics::{METRICS_FILE, MetricsLog};
pub use output::{CheckpointPolicy, LOCK, OutputDir, ResumeFrom, Rollback, checkpoint_name};
pub use validator::{ValidationReport, Validator};

use crate::checkpoint::load_checkpoint;
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::model::{EMA_SIDE_DIR, NATIVE_SIDE_DIR};
use crate::train::{StepStats, Trainer};

/// How a training run validates, saves and resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// Checkpoints, `metrics.jsonl` and the exported side network go here.
    pub output_dir: PathBuf,
    /// Validate every N steps (0: only at the end; always at the last step).
    pub validation_steps: u64,
    /// Also validate before the first step of a fresh run (the prior alone: the side
    /// branch starts at zero).
    pub validate_at_start: bool,
    /// When checkpoints are saved and how many are kept.
    pub checkpoints: CheckpointPolicy,
    /// Resume from a checkpoint instead of starting fresh.
    pub resume: Option<ResumeFrom>,
    /// What a resume from an older checkpoint does with the run's later ones.
    pub rollback: Rollback,
    /// Start fresh in a folder holding another run's outputs, deleting them.
    pub overwrite: bool,
}

impl RunOptions {
    /// A fresh run into `output_dir` that validates every `validation_steps` steps and saves
    /// one checkpoint, at the end.
    pub fn new(output_dir: impl Into<PathBuf>, validation_steps: u64) -> Self {
        Self {
            output_dir: output_dir.into(),
            validation_steps,
            validate_at_start: false,
            checkpoints: CheckpointPolicy::default(),
            resume: None,
            rollback: Rollback::default(),
            overwrite: false,
        }
    }

    /// Whether step `step` of `total` validates.
    pub fn validates_at(&self, step: u64, total: u64) -> bool {
        (self.validation_steps > 0 && step.is_multiple_of(self.validation_steps)) || step == total
    }
}

/// What a run reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Resumed from a checkpoint.
    Resumed {
        /// The checkpoint folder.
        checkpoint: &'a Path,
        /// The step it holds.
        step: u64,
    },
    /// About to take its first step.
    Started {
        /// Steps already done (0 unless resumed).
        first_step: u64,
        /// The run's last step.
        total_steps: u64,
        /// Training examples.
        examples: usize,
        /// Parameters trained.
        trained_parameters: usize,
    },
    /// `τ`'s measured scale per timestep bucket, low noise first (`normalize_tau`).
    TauScale(&'a [f32]),
    /// An optimizer step finished.
    Step {
        /// What it measured.
        stats: &'a StepStats,
        /// Steps per second of training time since the run (or its resume) started.
        steps_per_second: f64,
    },
    /// A validation finished (before the step's [`Event::Step`]).
    Validation {
        /// The step validated (0: before the first).
        step: u64,
        /// What it measured.
        report: &'a ValidationReport,
    },
    /// A resume from an older checkpoint retired the same run's later ones.
    RolledBack {
        /// The step resumed from.
        step: u64,
        /// The checkpoints retired.
        retired: &'a [PathBuf],
        /// Where they were moved (None: deleted).
        moved_to: Option<&'a Path>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its folder.
        path: &'a Path,
    },
    /// The run finished: its last step is done and its side network exported.
    Finished {
        /// What it measured.
        report: &'a RunReport,
        /// The side network in the architecture's native format, when it has one.
        exported: Option<&'a Path>,
        /// Its EMA weights in the same format (a run with EMA).
        exported_ema: Option<&'a Path>,
    },
}

/// Receives a run's [`Event`]s (progress displays, image files). An error stops the run.
pub trait Observer {
    /// Called for each event, in order.
    fn on_event(&mut self, event: &Event<'_>) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// An observer that ignores every event.
impl Observer for () {
    fn on_event(&mut self, _: &Event<'_>) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// `(step, score)` of every validation that reported a score (the toy: IoU).
    pub validations: Vec<(u64, f32)>,
    /// The stats of every step this process ran.
    pub steps: Vec<StepStats>,
    /// Seconds spent in training steps (validation excluded).
    pub train_seconds: f64,
    /// Wall-clock seconds of the whole run.
    pub wall_seconds: f64,
}

impl RunReport {
    /// The score of the last validation.
    pub fn final_score(&self) -> Option<f32> {
        self.validations.last().map(|v| v.1)
    }

    /// The first validated step whose score reached `threshold`.
    pub fn steps_to(&self, threshold: f32) -> Option<u64> {
        self.validations.iter().find(|v| v.1 >= threshold).map(|v| v.0)
    }

    /// Steps per second of training time.
    pub fn steps_per_second(&self) -> f64 {
        self.steps.len() as f64 / self.train_seconds.max(1e-9)
    }
}

/// Trains `trainer` on `data` up to its `max_train_steps` (docs/method.md §3), as `options`
/// say: locks the output folder, resumes from a checkpoint or refuses (or, with `overwrite`,
/// removes) another run's outputs there, then steps, validates with `validator` when due,
/// appends one metrics row per step, saves and prunes checkpoints, and exports the side
/// network in its architecture's native format at the end.
///
/// In a data-parallel run ([`Trainer::join`]) every rank calls `run` with the same options:
/// the first rank does all of the above, the others only resume (from the checkpoint the
/// first rank's folder holds), check that they agree with it, and step; they validate,
/// write and report nothing. A rank that fails tells the others, whose next step fails too.
pub fn run<B: lisa_core::backend::Backend>(
    trainer: &mut Trainer<B>,
    data: &dyn Dataset,
    validator: Option<&mut dyn Validator<B>>,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunReport> {
    let result = match trainer.is_first_rank() {
        true => run_first(trainer, data, validator, options, observer),
        false => run_rank(trainer, data, options),
    };
    if let Some(parallel) = trainer.parallel.as_mut() {
        match &result {
            Ok(_) => parallel.finish(),
            Err(e) => parallel.abort(&e.to_string()),
        }
    }
    result
}

/// A resume continues with the ranks that wrote the checkpoint: another number would change
/// the global batch (ranks × batch size) in mid-run.
fn same_ranks<B: lisa_core::backend::Backend>(trainer: &Trainer<B>, ckpt: &Path) -> Result<()> {
    let (wrote, now) = (trainer.run.state.ranks, trainer.shard().world as u64);
    if wrote == now || trainer.run.state.step == 0 {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "{} was written by a run of {wrote} rank(s), and this run has {now}: the global batch (ranks × batch size) would change; resume on {wrote} rank(s)",
        ckpt.display()
    )))
}

/// A rank other than the first: resume, agree, step.
fn run_rank<B: lisa_core::backend::Backend>(
    trainer: &mut Trainer<B>,
    data: &dyn Dataset,
    options: &RunOptions,
) -> Result<RunReport> {
    let wall = Instant::now();
    if let Some(from) = &options.resume {
        let ckpt = output::resume_target_in(&options.output_dir, from)?;
        load_checkpoint(trainer, data, &ckpt)?;
        same_ranks(trainer, &ckpt)?;
    }
    trainer.check_ranks_agree()?;
    trainer.tau_norm(data)?;
    let mut report = RunReport::default();
    while trainer.run.state.step < trainer.config.max_train_steps {
        let step_start = Instant::now();
        let stats = trainer.step(data)?;
        report.train_seconds += step_start.elapsed().as_secs_f64();
        report.steps.push(stats);
    }
    report.wall_seconds = wall.elapsed().as_secs_f64();
    Ok(report)
}

/// The first rank (or a run alone): everything.
fn run_first<B: lisa_core::backend::Backend>(
    trainer: &mut Trainer<B>,
    data: &dyn Dataset,
    mut validator: Option<&mut dyn Validator<B>>,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<RunReport> {
    let mut notify = |e: Event<'_>| observer.on_event(&e).map_err(|e| TrainError::Observer(e.to_string()));
    let wall = Instant::now();
    let dir = OutputDir::lock(&options.output_dir)?;
    let out = dir.path();
    let metrics_path = out.join(METRICS_FILE);
    match &options.resume {
        Some(from) => {
            let ckpt = dir.resume_target(from)?;
            load_checkpoint(trainer, data, &ckpt)?;
            same_ranks(trainer, &ckpt)?;
            dir.refuse_others(&trainer.run_id, &[], false)?;
            let step = trainer.run.state.step;
            MetricsLog::keep_until(&metrics_path, &trainer.run_id, step)?;
            notify(Event::Resumed { checkpoint: &ckpt, step })?;
            // The branch this resume abandons: `latest` and pruning must never pick it up.
            let (retired, moved_to) = dir.retire_after(&trainer.run_id, step, options.rollback)?;
            if !retired.is_empty() {
                notify(Event::RolledBack { step, retired: &retired, moved_to: moved_to.as_deref() })?;
            }
        }
        None => {
            // Outputs a new run writes: another run's are refused (or removed when told). A
            // metrics file of a run stopped before its first step holds nothing to keep.
            let mut own_outputs = vec![out.join(NATIVE_SIDE_DIR), out.join(EMA_SIDE_DIR)];
            if !MetricsLog::records_no_training(&metrics_path) {
                own_outputs.push(metrics_path.clone());
            }
            dir.refuse_others(&trainer.run_id, &own_outputs, options.overwrite)?;
            if metrics_path.exists() {
                std::fs::remove_file(&metrics_path)
                    .map_err(|error| TrainError::Io { path: metrics_path.clone(), error })?;
            }
        }
    }
    trainer.check_ranks_agree()?;
    let total = trainer.config.max_train_steps;
    let first = trainer.run.state.step;
    notify(Event::Started {
        first_step: first,
        total_steps: total,
        examples: data.len(),
        trained_parameters: trainer.model.store().count(true),
    })?;
    let mut metrics = MetricsLog::append(&metrics_path, &trainer.run_id)?;
    let mut report = RunReport::default();
    if let Some(norm) = trainer.tau_norm(data)? {
        notify(Event::TauScale(norm.rms()))?;
    }
    if let Some(v) = validator.as_deref_mut()
        && options.validate_at_start
        && first == 0
    {
        let validation = validate(v, trainer)?;
        report.validations.extend(validation.score.map(|s| (0, s)));
        notify(Event::Validation { step: 0, report: &validation })?;
        let mut row = validation.metrics;
        row.insert("step".into(), 0.into());
        metrics.write(row)?;
    }
    while trainer.run.state.step < total {
        let step_start = Instant::now();
        let stats = trainer.step(data)?;
        report.train_seconds += step_start.elapsed().as_secs_f64();
        let steps_per_second = (stats.step - first) as f64 / report.train_seconds;
        let mut row = step_row(&stats, steps_per_second);
        if let Some(v) = validator.as_deref_mut() {
            for column in v.columns() {
                row.insert(column.to_string(), serde_json::Value::Null);
            }
            if options.validates_at(stats.step, total) {
                let validated = validate(v, trainer).and_then(|validation| {
                    notify(Event::Validation { step: stats.step, report: &validation })?;
                    Ok(validation)
                });
                match validated {
                    Ok(validation) => {
                        report.validations.extend(validation.score.map(|s| (stats.step, s)));
                        row.extend(validation.metrics);
                    }
                    Err(e) => {
                        // A failed validation (an unwritable grid) loses no training: the
                        // step's row, a checkpoint and, at the end, the export come first.
                        metrics.write(row)?;
                        dir.save(trainer, data, stats.step, &options.checkpoints)?;
                        if stats.step == total {
                            export(trainer, out)?;
                        }
                        return Err(e);
                    }
                }
            }
        }
        notify(Event::Step { stats: &stats, steps_per_second })?;
        metrics.write(row)?;
        report.steps.push(stats);
        if options.checkpoints.saves_at(stats.step, total) {
            let path = dir.save(trainer, data, stats.step, &options.checkpoints)?;
            notify(Event::Checkpoint { path: &path })?;
        }
    }
    let (exported, exported_ema) = export(trainer, out)?;
    report.wall_seconds = wall.elapsed().as_secs_f64();
    notify(Event::Finished { report: &report, exported: exported.as_deref(), exported_ema: exported_ema.as_deref() })?;
    Ok(report)
}

/// Validates the run's model: with its EMA weights when it keeps an EMA (the weights a user
/// samples with), else the trained ones.
fn validate<B: lisa_core::backend::Backend>(
    v: &mut dyn Validator<B>,
    trainer: &mut Trainer<B>,
) -> Result<ValidationReport> {
    match trainer.with_ema_weights(|t| v.validate(t)) {
        Some(report) => report,
        None => v.validate(trainer),
    }
}

/// Exports the side network (and its EMA weights) in the architecture's native format into
/// `out`: the folders written.
fn export<B: lisa_core::backend::Backend>(
    trainer: &mut Trainer<B>,
    out: &Path,
) -> Result<(Option<PathBuf>, Option<PathBuf>)> {
    let (native, ema) = (out.join(NATIVE_SIDE_DIR), out.join(EMA_SIDE_DIR));
    let exported = trainer.model.export_side(&native)?;
    let exported_ema = trainer.with_ema_weights(|t| t.model.export_side(&ema)).transpose()?.unwrap_or(false);
    Ok((exported.then_some(native), exported_ema.then_some(ema)))
}

/// The metrics row of a step: its stats and the training speed.
fn step_row(s: &StepStats, steps_per_second: f64) -> serde_json::Map<String, serde_json::Value> {
    let mut row: serde_json::Map<String, serde_json::Value> = [
        ("step", s.step.into()),
        ("loss", s.loss.into()),
        ("main_loss", s.main_loss.into()),
        ("lisa_loss", s.lisa_loss.into()),
        ("lisa_zero_distance", s.lisa_zero_distance.into()),
        ("grad_norm", s.grad_norm.into()),
        ("lr", s.lr.into()),
        ("steps_per_s", steps_per_second.into()),
    ]
    .into_iter()
    .map(|(k, v): (&str, serde_json::Value)| (k.to_string(), v))
    .collect();
    if let Some(scale) = s.loss_scale {
        row.insert("loss_scale".into(), scale.into());
        row.insert("skipped".into(), s.skipped.into());
    }
    row
}
