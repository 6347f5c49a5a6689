//! `lisa pretrain`.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use lisa_core::backend::Backend;
use lisa_trainer::pretrain::Pretrainer;

use crate::config::RunFile;

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
pub fn run<B: Backend>(a: PretrainArgs, device: B::Device) -> Result<(), String> {
    let mut file = RunFile::load(a.config.as_deref())?;
    let p = &mut file.pretrain;
    p.max_train_steps = a.max_train_steps.unwrap_or(p.max_train_steps);
    p.batch_size = a.train_batch_size.unwrap_or(p.batch_size);
    p.optim.lr = a.learning_rate.unwrap_or(p.optim.lr);
    p.seed = a.seed.unwrap_or(p.seed);
    if let Some(d) = a.train_data_dir {
        file.data.dir = Some(d);
    }
    let data = file.open_training_set()?;
    let mut trainer =
        Pretrainer::<B>::new(&file.model.unet, file.pretrain.clone(), device).map_err(|e| e.to_string())?;
    eprintln!(
        "pretrain: {} examples, batch {}, {} steps, {} parameters",
        data.len(),
        file.pretrain.batch_size,
        file.pretrain.max_train_steps,
        trainer.store.count(true)
    );
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let start = Instant::now();
    for _ in 0..file.pretrain.max_train_steps {
        let s = trainer.step(data.as_ref()).map_err(|e| e.to_string())?;
        if s.step % 50 == 0 || s.step == file.pretrain.max_train_steps {
            eprintln!(
                "step {:6}  loss {:.4}  lr {:.2e}  {:.2} it/s",
                s.step,
                s.loss,
                s.lr,
                s.step as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    trainer.export(&a.output).map_err(|e| e.to_string())?;
    eprintln!("wrote {} ({:.1} min)", a.output.display(), start.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
