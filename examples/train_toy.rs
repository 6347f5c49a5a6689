//! Trains the toy ControlNet with LISA through the library alone: the shipped prior, the
//! procedural fill-circles data, the library's training run (checkpoints, metrics.jsonl) and
//! its toy validation (IoU), with a few lines of progress printed by an observer.
//!
//! ```text
//! cargo run --release -p lisa-examples --example train_toy -- [steps] [output folder]
//! ```

use std::path::Path;

use lisa_cpu::{CpuBackend, CpuDevice};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::registry;
use lisa_trainer::sample::SampleConfig;
use lisa_trainer::session::{self, Event, Observer, RunOptions};
use lisa_trainer::train::{TrainConfig, Trainer};
use lisa_trainer::validation::ToyValidation;

/// Prints each validation's IoU and the end of the run.
struct Print;

impl Observer for Print {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match event {
            Event::Validation { step, report } => {
                println!("step {step:4}: iou {:.3}", report.score.unwrap_or(f32::NAN))
            }
            Event::Finished { report, .. } => println!("{:.1} steps/s", report.steps_per_second()),
            _ => {}
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps = args.get(1).map_or(Ok(40), |s| s.parse())?;
    let out = args.get(2).map_or("runs/example-train-toy", String::as_str);
    let prior = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/prior.safetensors");
    let spec = registry::spec_of_weights(&prior)?.ok_or("the prior records no model")?;
    let config = TrainConfig { max_train_steps: steps, batch_size: 16, ..TrainConfig::default() };
    let mut trainer = Trainer::<CpuBackend>::from_pretrained(&spec, config, &prior, None, CpuDevice)?;
    let resolution = trainer.model.sample_shape()[1];
    let data = FillCircles { resolution, len: 50_000, seed: 0 };
    let validation_set = FillCircles { resolution, len: 16, seed: 0x7a11d };
    let noise = trainer.config.noise;
    let mut validation =
        ToyValidation::new(trainer.model.as_ref(), &noise, validation_set, SampleConfig::default(), 0x7a11d)?;
    let options = RunOptions { validate_at_start: true, overwrite: true, ..RunOptions::new(out, steps / 2) };
    session::run(&mut trainer, &data, Some(&mut validation), &options, &mut Print)?;
    Ok(())
}
