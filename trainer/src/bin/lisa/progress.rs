//! The progress bar of training runs: loss, last IoU, it/s and time left on one line when
//! stderr is a terminal; a plain log line every 5 % of the run (and at each validation)
//! otherwise, so logs stay readable.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use lisa_trainer::train::StepStats;

/// One run's progress display.
pub struct Progress {
    label: String,
    first: u64,
    total: u64,
    iou: Option<f32>,
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    /// A bar for steps `first+1 ..= total`.
    pub fn new(label: &str, first: u64, total: u64) -> Self {
        Self {
            label: label.to_string(),
            first,
            total,
            iou: None,
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last_draw: None,
        }
    }

    /// Records a validation (printed on its own line).
    pub fn validation(&mut self, step: u64, iou: f32) {
        self.iou = Some(iou);
        self.clear();
        eprintln!("{} step {step:6}  validation iou {iou:.4}", self.label);
    }

    /// Shows step `s`.
    pub fn step(&mut self, s: &StepStats, its: f64) {
        let done = s.step.saturating_sub(self.first);
        let todo = self.total.saturating_sub(self.first).max(1);
        let left = (self.total.saturating_sub(s.step)) as f64 / its.max(1e-9);
        let iou = self.iou.map_or("  -   ".to_string(), |v| format!("{v:.4}"));
        let text = format!(
            "{} {:>6}/{}  loss {:.4} (main {:.4}, lisa {:.4})  iou {iou}  {:.2} it/s  eta {}",
            self.label,
            s.step,
            self.total,
            s.loss,
            s.main_loss,
            s.lisa_loss,
            its,
            clock(left)
        );
        if self.tty {
            let due = self.last_draw.is_none_or(|t| t.elapsed().as_millis() >= 100) || s.step == self.total;
            if due {
                let width = 24usize;
                let filled = (done as usize * width / todo as usize).min(width);
                eprint!("\r\x1b[2K[{}{}] {text}", "#".repeat(filled), ".".repeat(width - filled));
                let _ = std::io::stderr().flush();
                self.last_draw = Some(Instant::now());
            }
        } else {
            let every = (todo / 20).max(1);
            if done.is_multiple_of(every) || s.step == self.total {
                eprintln!("{text}");
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        self.clear();
        eprintln!("{} finished in {}", self.label, clock(self.start.elapsed().as_secs_f64()));
    }

    fn clear(&mut self) {
        if self.tty && self.last_draw.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// `m:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}
