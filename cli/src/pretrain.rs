//! `lisa pretrain`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lisa_core::backend::Backend;
use lisa_trainer::pretrain::Pretrainer;

use crate::config::RunFile;
use crate::progress::Progress;

/// Flags of `lisa pretrain` (override the run file).
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Run file (TOML) whose values the flags override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the prior's EMA weights are written (safetensors).
    #[arg(long, default_value = "runs/pretrain/main.safetensors")]
    output: PathBuf,
    /// Optimizer steps.
    #[arg(long)]
    max_train_steps: Option<u64>,
    /// Examples per step.
    #[arg(long)]
    train_batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// A Fill50K-format folder to train on (default: procedural fill circles).
    #[arg(long)]
    train_data_dir: Option<PathBuf>,
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
    let mut trainer = Pretrainer::<B>::new(&file.model, file.pretrain.clone(), device)?;
    let data = file.open_training_set(trainer.model.as_ref())?;
    eprintln!(
        "pretrain: {} examples, batch {}, {} steps, {} parameters",
        data.len(),
        file.pretrain.batch_size,
        file.pretrain.max_train_steps,
        trainer.model.store().count(true)
    );
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let start = Instant::now();
    let mut progress = Progress::new("pretrain", 0, file.pretrain.max_train_steps);
    for _ in 0..file.pretrain.max_train_steps {
        let s = trainer.step(data.as_ref())?;
        progress.step(&s, s.step as f64 / start.elapsed().as_secs_f64());
    }
    progress.finish(start.elapsed().as_secs_f64());
    trainer.export(&a.output)?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
