//! `lisa`: pretrain a prior, train a ControlNet side branch with or without LISA, sample and
//! evaluate controllability, on the fill-circles task.
//!
//! Every command prints a clear message and exits non-zero on bad input; nothing panics on
//! user input.

mod config;
mod eval;
mod pretrain;
mod sample;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Likelihood Score Alignment for controllable diffusion (CPU backend).
#[derive(Debug, Parser)]
#[command(name = "lisa", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pretrain the main (prior) model on images + prompts; writes its EMA weights.
    Pretrain(pretrain::PretrainArgs),
    /// Train the side branch (ControlNet) with LISA or the baseline objective.
    Train(train::TrainArgs),
    /// Generate images for condition image(s) and a prompt.
    Sample(sample::SampleArgs),
    /// Controllability IoU and colour fidelity of a checkpoint on the fixed validation set.
    Eval(eval::EvalArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pretrain(a) => pretrain::run(a),
        Command::Train(a) => train::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Eval(a) => eval::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
