//! What a training run validates with: a [`Validator`] it calls at its validation steps, and
//! what one validation reports. The implementations live in [`crate::validation`].

use lisa_core::backend::Backend;

use crate::error::Result;
use crate::grid::RgbGrid;
use crate::train::Trainer;

/// What one validation measured.
#[derive(Debug, Clone, Default)]
pub struct ValidationReport {
    /// The headline score progress displays show and run reports collect (the toy: IoU; a
    /// latent pipeline with a control score: its first column).
    pub score: Option<f32>,
    /// The headline score's name (its metrics column: `iou`, `control_f1`, …).
    pub score_name: &'static str,
    /// Named values added to the step's metrics row.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// A picture of the validation (condition | sample pairs).
    pub grid: Option<RgbGrid>,
}

/// Validates a control-training run at the steps the run chooses.
pub trait Validator<B: Backend> {
    /// The metrics this validator reports that every metrics row carries (null where the step
    /// did not validate), so that rows have the same columns.
    fn columns(&self) -> &[&'static str] {
        &[]
    }

    /// Measures the run's current model (never changes it).
    fn validate(&mut self, trainer: &Trainer<B>) -> Result<ValidationReport>;
}
