//! `lisa pretrain`: the prior, with checkpoints and exact resume like `lisa train`; the EMA
//! weights are exported with the model's description at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_trainer::checkpoint::load_checkpoint;
use lisa_trainer::pretrain::Pretrainer;
use lisa_trainer::session::OutputDir;

use crate::config::{RunFile, check_memory, name_setting};
use crate::progress::{Progress, rolled_back};
use crate::run_dir::CheckpointArgs;

/// Flags of `lisa pretrain` (override the run file).
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Run file (TOML) whose values the flags override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the prior's EMA weights are written at the end (safetensors; default:
    /// `<output-dir>/main.safetensors`). An existing file is replaced only with --overwrite
    /// (which also lets a new run start in an --output-dir holding another run's checkpoints).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Where checkpoints go.
    #[arg(long, default_value = "runs/pretrain")]
    output_dir: PathBuf,
    #[command(flatten)]
    checkpoints: CheckpointArgs,
    /// Optimizer steps.
    #[arg(long)]
    max_train_steps: Option<u64>,
    /// Examples per step.
    #[arg(long)]
    train_batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f32>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A Fill50K-format folder to train on (default: procedural fill circles).
    #[arg(long)]
    train_data_dir: Option<PathBuf>,
}

/// Checks before any work that `output` can be written: not a folder, not an existing file
/// unless `overwrite`, its folder creatable and writable.
fn check_output(output: &Path, overwrite: bool) -> Result<()> {
    if output.is_dir() {
        bail!("--output {} is a folder; give a file name", output.display());
    }
    if output.exists() && !overwrite {
        bail!("--output {} exists; pass --overwrite to replace it, or choose another name", output.display());
    }
    let dir = output.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let probe = dir.join(format!(".lisa-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("cannot write in {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Runs `lisa pretrain`.
pub fn run<B: Backend>(a: PretrainArgs, device: B::Device) -> Result<()> {
    let mut file = RunFile::load(a.config.as_deref())?;
    let p = &mut file.pretrain;
    p.max_train_steps = a.max_train_steps.unwrap_or(p.max_train_steps);
    p.batch_size = a.train_batch_size.unwrap_or(p.batch_size);
    p.optim.lr = a.learning_rate.unwrap_or(p.optim.lr);
    p.seed = a.seed.unwrap_or(p.seed);
    if let Some(d) = a.train_data_dir {
        file.data.dir = Some(d);
    }
    let flags = [
        ("pretrain.batch_size", "--train-batch-size", a.train_batch_size.is_some()),
        ("pretrain.optim.lr", "--learning-rate", a.learning_rate.is_some()),
    ];
    file.pretrain.validate().map_err(|e| name_setting(e, &flags, a.config.as_deref()))?;
    let output = a.output.clone().unwrap_or_else(|| a.output_dir.join("main.safetensors"));
    // A resumed run may replace the weights file it will write again.
    check_output(&output, a.checkpoints.overwrite || a.checkpoints.resume_from_checkpoint.is_some())?;
    let mut trainer = Pretrainer::<B>::new(&file.model, file.pretrain.clone(), device)?;
    check_memory(trainer.model.as_ref(), file.pretrain.batch_size)?;
    let data = file.open_training_set(trainer.model.as_ref())?;
    let dir = OutputDir::lock(&a.output_dir)?;
    let c = &a.checkpoints;
    match &c.resume_from_checkpoint {
        Some(named) => {
            let ckpt = dir.resume_target(named)?;
            load_checkpoint(&mut trainer, data.as_ref(), &ckpt)?;
            dir.refuse_others(&trainer.run_id, &[], false)?;
            let step = trainer.run.state.step;
            let (retired, moved_to) = dir.retire_after(&trainer.run_id, step, c.rollback)?;
            if !retired.is_empty() {
                eprintln!("{}", rolled_back(step, &retired, moved_to.as_deref()));
            }
            eprintln!("resumed from {} at step {}", ckpt.display(), trainer.run.state.step);
        }
        None => dir.refuse_others(&trainer.run_id, &[], c.overwrite)?,
    }
    let total = file.pretrain.max_train_steps;
    eprintln!(
        "pretrain: {} examples, batch {}, {} steps, {} parameters",
        data.len(),
        file.pretrain.batch_size,
        total,
        trainer.model.store().count(true)
    );
    let start = Instant::now();
    let first = trainer.run.state.step;
    let mut progress = Progress::new("pretrain", first, total);
    while trainer.run.state.step < total {
        let s = trainer.step(data.as_ref())?;
        progress.step(&s, (s.step - first) as f64 / start.elapsed().as_secs_f64());
        let policy = c.policy();
        if policy.saves_at(s.step, total) {
            dir.save(&mut trainer, data.as_ref(), s.step, &policy)?;
        }
    }
    progress.finish(start.elapsed().as_secs_f64());
    trainer.export(&output)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}
