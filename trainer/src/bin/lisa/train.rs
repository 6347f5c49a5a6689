//! `lisa train`: the side branch, with LISA or the baseline objective.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use lisa_core::{Distance, TargetSpace};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::checkpoint::{load_checkpoint, save_checkpoint};
use lisa_trainer::model::DualModel;
use lisa_trainer::train::{Mode, Trainer};

use crate::config::RunFile;
use crate::eval::validate;

/// Flags of `lisa train` (names as in diffusers' `train_controlnet.py`; they override the
/// run file).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run file (TOML) whose values the flags override.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The pretrained prior (safetensors written by `lisa pretrain`).
    #[arg(long)]
    main: PathBuf,
    /// Train with the LISA term (the default).
    #[arg(long, conflicts_with = "baseline")]
    lisa: bool,
    /// Train the plain ControlNet baseline (no decoder, no prior pass).
    #[arg(long)]
    baseline: bool,
    /// Side layer the LISA decoder reads: down_0 .. down_N | mid.
    #[arg(long)]
    hook: Option<String>,
    /// λ, the weight of the LISA term.
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f64>,
    /// prediction | score.
    #[arg(long)]
    target_space: Option<String>,
    /// mse | cosine.
    #[arg(long)]
    distance: Option<String>,
    /// Apply LISA to the first N samples of each batch only.
    #[arg(long)]
    lisa_subbatch: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Optimizer steps.
    #[arg(long)]
    max_train_steps: Option<u64>,
    /// Examples per micro-batch.
    #[arg(long)]
    train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f32>,
    /// constant | constant_with_warmup | cosine.
    #[arg(long)]
    lr_scheduler: Option<String>,
    /// Warm-up steps.
    #[arg(long)]
    lr_warmup_steps: Option<u64>,
    /// Gradient-norm clip.
    #[arg(long)]
    max_grad_norm: Option<f32>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    checkpointing_steps: u64,
    /// Keep at most N checkpoints (oldest removed first).
    #[arg(long)]
    checkpoints_total_limit: Option<usize>,
    /// A checkpoint directory, or "latest" (the newest in --output-dir).
    #[arg(long)]
    resume_from_checkpoint: Option<String>,
    /// Validate (sample, IoU, grid) every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    validation_steps: u64,
    /// Where checkpoints, grids and metrics.jsonl go.
    #[arg(long, default_value = "runs/train")]
    output_dir: PathBuf,
}

fn checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Applies the flags to the run file.
fn apply(a: &TrainArgs, file: &mut RunFile) -> Result<(), String> {
    let t = &mut file.train;
    if a.baseline {
        t.mode = Mode::Baseline;
    } else if a.lisa {
        t.mode = Mode::Lisa;
    }
    if let Some(h) = &a.hook {
        file.model.decoder.hook = h.parse().map_err(|e: lisa_trainer::TrainError| e.to_string())?;
    }
    if let Some(l) = a.lambda {
        if !(l >= 0.0 && l.is_finite()) {
            return Err(format!("--lambda must be finite and >= 0, got {l}"));
        }
        t.lisa.lambda = l;
    }
    if let Some(s) = &a.target_space {
        t.lisa.target_space = match s.as_str() {
            "prediction" => TargetSpace::Prediction,
            "score" => TargetSpace::Score,
            _ => return Err(format!("--target-space {s:?}: prediction | score")),
        };
    }
    if let Some(d) = &a.distance {
        t.lisa.distance = match d.as_str() {
            "mse" => Distance::Mse,
            "cosine" => Distance::Cosine,
            _ => return Err(format!("--distance {d:?}: mse | cosine")),
        };
    }
    if let Some(s) = &a.lr_scheduler {
        t.optim.schedule = s.parse().map_err(|e: lisa_trainer::TrainError| e.to_string())?;
    }
    t.lisa_subbatch = a.lisa_subbatch.or(t.lisa_subbatch);
    t.seed = a.seed.unwrap_or(t.seed);
    t.max_train_steps = a.max_train_steps.unwrap_or(t.max_train_steps);
    t.batch_size = a.train_batch_size.unwrap_or(t.batch_size);
    t.gradient_accumulation_steps = a.gradient_accumulation_steps.unwrap_or(t.gradient_accumulation_steps);
    t.optim.lr = a.learning_rate.unwrap_or(t.optim.lr);
    t.optim.warmup_steps = a.lr_warmup_steps.unwrap_or(t.optim.warmup_steps);
    if let Some(c) = a.max_grad_norm {
        t.optim.max_grad_norm = Some(c);
    }
    Ok(())
}

/// Runs `lisa train`.
pub fn run(a: TrainArgs) -> Result<(), String> {
    let mut file = RunFile::load(a.config.as_deref())?;
    apply(&a, &mut file)?;
    let mode = file.train.mode;
    let mut model =
        DualModel::<C>::new(&file.model, mode == Mode::Lisa, CpuDevice, file.train.seed).map_err(|e| e.to_string())?;
    model.load_main(&a.main).map_err(|e| e.to_string())?;
    let mut trainer = Trainer::new(model, file.train.clone()).map_err(|e| e.to_string())?;
    let out = &a.output_dir;
    if let Some(r) = &a.resume_from_checkpoint {
        let dir = if r == "latest" {
            checkpoints(out)
                .pop()
                .map(|(_, p)| p)
                .ok_or_else(|| format!("--resume-from-checkpoint latest: no checkpoint-* in {}", out.display()))?
        } else {
            PathBuf::from(r)
        };
        if !dir.is_dir() {
            return Err(format!("--resume-from-checkpoint: {} does not exist", dir.display()));
        }
        load_checkpoint(&mut trainer, &dir).map_err(|e| e.to_string())?;
        eprintln!("resumed from {} at step {}", dir.display(), trainer.run.state.step);
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let data = file.training_set();
    let t = &file.train;
    eprintln!(
        "train ({mode:?}): {} examples, effective batch {} ({} x {}), {} steps, {} parameters trained, hook {}",
        data.len,
        t.batch_size * t.gradient_accumulation_steps,
        t.batch_size,
        t.gradient_accumulation_steps,
        t.max_train_steps,
        trainer.model.store.count(true),
        file.model.decoder.hook
    );
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| format!("{}: {e}", metrics_path.display()))?;
    let val_set = file.validation_set();
    let start = Instant::now();
    let first = trainer.run.state.step;
    while trainer.run.state.step < t.max_train_steps {
        let s = trainer.step(&data).map_err(|e| e.to_string())?;
        let its = (s.step - first) as f64 / start.elapsed().as_secs_f64();
        let last = s.step == t.max_train_steps;
        let mut iou = None;
        if (a.validation_steps > 0 && s.step % a.validation_steps == 0) || last {
            let v = validate(&trainer.model, &t.noise, &val_set, &file.validation.sampling)?;
            v.grid.save_png(&out.join(format!("validation-{:06}.png", s.step))).map_err(|e| e.to_string())?;
            eprintln!("step {:6}  validation iou {:.4}  colour error {:.4}", s.step, v.iou, v.colour_error);
            iou = Some(v.iou);
        }
        let line = serde_json::json!({"step": s.step, "loss": s.loss, "main_loss": s.main_loss, "lisa_loss": s.lisa_loss, "grad_norm": s.grad_norm, "lr": s.lr, "steps_per_s": its, "iou": iou});
        writeln!(metrics, "{line}").map_err(|e| format!("{}: {e}", metrics_path.display()))?;
        if s.step % 10 == 0 || last {
            eprintln!(
                "step {:6}/{}  loss {:.4}  main {:.4}  lisa {:.4}  {:.2} it/s",
                s.step, t.max_train_steps, s.loss, s.main_loss, s.lisa_loss, its
            );
        }
        if (a.checkpointing_steps > 0 && s.step % a.checkpointing_steps == 0) || last {
            save_checkpoint(&trainer, &out.join(format!("checkpoint-{}", s.step))).map_err(|e| e.to_string())?;
            if let Some(limit) = a.checkpoints_total_limit {
                let all = checkpoints(out);
                for (_, old) in all.iter().take(all.len().saturating_sub(limit.max(1))) {
                    std::fs::remove_dir_all(old).map_err(|e| format!("{}: {e}", old.display()))?;
                }
            }
        }
    }
    eprintln!("done in {:.1} min; outputs in {}", start.elapsed().as_secs_f64() / 60.0, out.display());
    Ok(())
}
