//! `lisa`: pretrain a prior, train a ControlNet side branch with or without LISA, sample and
//! evaluate controllability; `lisa demo` does the whole story on the fill-circles task.
//!
//! Every command prints a clear message and exits non-zero on bad input; nothing panics on
//! user input. The library behind it is `lisa-trainer`; this crate holds what only a command
//! needs: flags, run files, progress bars, image files and plots.

mod arm;
mod compare;
mod config;
mod control_score;
mod converted_dataset;
mod demo;
mod eval;
mod fill50k;
mod flux_train;
mod hf_dataset;
mod image;
mod parallel;
mod pipeline_start;
mod plot;
mod pretrain;
mod progress;
mod run_dir;
mod sample;
mod sd3_train;
mod sd_cache;
mod sd_validation;
mod shipped;
mod study;
mod tensorboard;
mod train;
mod train_data;
mod webdataset;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Train ControlNet-style side networks with LISA (Likelihood Score Alignment): pretrain a
/// prior, train with or without LISA, sample, evaluate, or run the demo.
#[derive(Debug, Parser)]
#[command(name = "lisa", version)]
struct Cli {
    /// Which backend runs the command (wgpu and cuda need the matching cargo feature).
    #[arg(long, value_enum, global = true, default_value = "cpu")]
    backend: BackendKind,
    #[command(subcommand)]
    command: Command,
}

/// The backends a `lisa` binary can be built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// lisa-cpu (always built).
    Cpu,
    /// lisa-cubecl on wgpu (Vulkan, Metal, DX12; `--features wgpu`).
    Wgpu,
    /// lisa-cubecl on CUDA (`--features cuda`).
    Cuda,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: train the side branch from the shipped prior with LISA (--compare:
    /// and the baseline), print IoU as it goes, write grids, metrics and a plot.
    Demo(demo::DemoArgs),
    /// Pretrain the main (prior) model on images + prompts; writes its EMA weights.
    Pretrain(pretrain::PretrainArgs),
    /// Train the side branch (ControlNet) with LISA or the baseline objective.
    Train(Box<train::TrainArgs>),
    /// Generate images for condition image(s) and a prompt.
    Sample(sample::SampleArgs),
    /// Controllability IoU and colour fidelity of a checkpoint on the fixed validation set.
    Eval(eval::EvalArgs),
    /// A grid of arms x seeds of control training (a TOML study file), resumable, with a
    /// summary over seeds (steps to IoU thresholds, speed-up against a reference arm) and a plot.
    Study(study::StudyArgs),
    /// Two runs' control metric against step (a LISA run and its baseline): steps to
    /// thresholds, the speed-up, and a chart of both curves, from their metrics.jsonl.
    Compare(compare::CompareArgs),
}

/// Runs `$body` with `$B` bound to the chosen backend type and `$device` to its device.
macro_rules! with_backend {
    ($kind:expr, $B:ident, $device:ident => $body:expr) => {
        match $kind {
            BackendKind::Cpu => {
                type $B = lisa_cpu::CpuBackend;
                let $device = lisa_cpu::CpuDevice;
                $body
            }
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => {
                type $B = lisa_cubecl::WgpuBackend;
                match $B::probe() {
                    Ok($device) => $body,
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                type $B = lisa_cubecl::CudaBackend;
                match $B::probe() {
                    Ok($device) => $body,
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
            #[allow(unreachable_patterns)]
            other => Err(anyhow::anyhow!(
                "this lisa was built without the {0} backend: rebuild with `--features {0}`",
                format!("{other:?}").to_lowercase()
            )),
        }
    };
}

fn main() -> ExitCode {
    // Reuse freed buffers instead of mapping fresh pages every op (faster CPU steps; figures in the lisa-cpu README).
    lisa_cpu::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => with_backend!(cli.backend, B, d => demo::run::<B>(a, d)),
        Command::Pretrain(a) => with_backend!(cli.backend, B, d => pretrain::run::<B>(a, d)),
        Command::Train(a) => with_backend!(cli.backend, B, d => train::run::<B>(*a, d)),
        Command::Sample(a) => with_backend!(cli.backend, B, d => sample::run::<B>(a, d)),
        Command::Eval(a) => with_backend!(cli.backend, B, d => eval::run::<B>(a, d)),
        Command::Study(a) => with_backend!(cli.backend, B, d => study::run::<B>(a, d)),
        Command::Compare(a) => compare::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed standard output (`lisa eval | head`) is the reader's choice, not a failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
