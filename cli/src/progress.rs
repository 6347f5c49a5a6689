//! The progress display of training runs: an `indicatif` bar with loss, last IoU, it/s and
//! time left when stderr is a terminal; a plain log line every 5 % of the run (and at each
//! validation) otherwise, so logs stay readable.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use lisa_trainer::session::{Event, Observer};
use lisa_trainer::train::StepStats;

use crate::image::save_grid;

/// One run's progress display.
pub struct Progress {
    label: String,
    first: u64,
    total: u64,
    /// The last validation's headline score and its name.
    score: Option<(&'static str, f32)>,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A display for steps `first+1 ..= total`.
    pub fn new(label: &str, first: u64, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total).with_position(first);
            let style = ProgressStyle::with_template("{prefix} [{bar:24}] {pos:>6}/{len} {msg} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>.");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        Self { label: label.to_string(), first, total, score: None, bar }
    }

    /// Records a validation's headline score `name` (printed on its own line).
    pub fn validation(&mut self, step: u64, name: &'static str, score: f32) {
        self.score = Some((name, score));
        self.line(format!("{} step {step:6}  validation {name} {score:.4}", self.label));
    }

    /// Shows step `s`.
    pub fn step(&mut self, s: &StepStats, its: f64) {
        if let Some(scale) = s.loss_scale {
            if s.skipped {
                self.line(format!(
                    "step {}: skipped (an inf/NaN gradient at loss scale {scale}); loss scale halved to {}",
                    s.step,
                    scale / 2.0
                ));
            } else if s.scale_grew {
                self.line(format!("step {}: loss scale doubled to {}", s.step, scale * 2.0));
            }
        }
        let score = self.score.map_or(String::new(), |(name, v)| format!("  {name} {v:.4}"));
        let losses = format!("loss {:.4} (main {:.4}, lisa {:.4}){score}", s.loss, s.main_loss, s.lisa_loss);
        match &self.bar {
            Some(bar) => {
                bar.set_message(losses);
                bar.set_position(s.step);
            }
            None => {
                let todo = self.total.saturating_sub(self.first).max(1);
                let done = s.step.saturating_sub(self.first);
                if done.is_multiple_of((todo / 20).max(1)) || s.step == self.total {
                    let left = self.total.saturating_sub(s.step) as f64 / its.max(1e-9);
                    eprintln!(
                        "{} {:>6}/{}  {losses}  {its:.2} it/s  eta {}",
                        self.label,
                        s.step,
                        self.total,
                        clock(left)
                    );
                }
            }
        }
    }

    /// Ends the display.
    pub fn finish(&mut self, seconds: f64) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{} finished in {}", self.label, clock(seconds));
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

/// What a resume from step `step` did with the run's later checkpoints `retired` (moved to
/// `moved_to`, or deleted).
pub fn rolled_back(step: u64, retired: &[PathBuf], moved_to: Option<&Path>) -> String {
    let names: Vec<String> =
        retired.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    let done = moved_to.map_or("deleted".to_string(), |dir| format!("moved to {}", dir.display()));
    format!("resuming from step {step}: this run's later checkpoints ({}) {done}", names.join(", "))
}

/// `m:ss`.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

/// What `lisa train`, `demo` and `study` show and write of a training run: the start summary,
/// the progress display, and each validation grid as `validation-<step>.png` in the run's
/// output folder.
pub struct RunDisplay {
    progress: Progress,
    label: String,
    output_dir: PathBuf,
    summary: String,
    tensorboard: Option<crate::tensorboard::TensorBoard>,
}

impl RunDisplay {
    /// The display of the run labelled `label` writing into `output_dir`; `summary` is printed
    /// when the run starts.
    pub fn new(label: &str, output_dir: &Path, summary: String) -> Self {
        Self {
            progress: Progress::new(label, 0, 0),
            label: label.to_string(),
            output_dir: output_dir.to_path_buf(),
            summary,
            tensorboard: None,
        }
    }

    /// The same display, also writing TensorBoard event files into `logging_dir` when given.
    pub fn with_tensorboard(mut self, logging_dir: Option<PathBuf>) -> Self {
        self.tensorboard = logging_dir.map(crate::tensorboard::TensorBoard::new);
        self
    }
}

impl Observer for RunDisplay {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // A TensorBoard file that cannot be written (a full disk under logs/) costs the
        // TensorBoard report, not the training: said once, then no more events are written.
        if let Some(tb) = &mut self.tensorboard
            && let Err(e) = tb.on_event(event)
        {
            eprintln!("warning: --report-to tensorboard stops: {e:#}; metrics.jsonl and the checkpoints go on");
            self.tensorboard = None;
        }
        match event {
            Event::Resumed { checkpoint, step } => eprintln!("resumed from {} at step {step}", checkpoint.display()),
            Event::Started { first_step, total_steps, .. } => {
                eprintln!("{}", self.summary);
                self.progress = Progress::new(&self.label, *first_step, *total_steps);
            }
            Event::TauScale(rms) => {
                let rms: Vec<String> = rms.iter().map(|r| format!("{r:.3}")).collect();
                println!("{}: τ's scale per timestep bucket, low noise first: {}", self.label, rms.join(" "));
            }
            Event::Validation { step, report } => {
                if let Some(grid) = &report.grid {
                    let path = self.output_dir.join(format!("validation-{step:06}.png"));
                    save_grid(grid, &path).map_err(|e| format!("{e:#}"))?;
                }
                if let Some(score) = report.score {
                    self.progress.validation(*step, report.score_name, score);
                }
            }
            Event::Step { stats, steps_per_second } => self.progress.step(stats, *steps_per_second),
            Event::RolledBack { step, retired, moved_to } => eprintln!("{}", rolled_back(*step, retired, *moved_to)),
            Event::Checkpoint { .. } => {}
            Event::Finished { report, exported, exported_ema } => {
                self.progress.finish(report.wall_seconds);
                if let Some(dir) = exported {
                    eprintln!("the trained side network, in its native format: {}", dir.display());
                }
                if let Some(dir) = exported_ema {
                    eprintln!("its EMA weights, in the same format: {}", dir.display());
                }
            }
        }
        Ok(())
    }
}
