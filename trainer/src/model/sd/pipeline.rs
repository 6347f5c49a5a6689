//! A diffusers Stable Diffusion pipeline folder (`model_index.json`, `unet/`, `scheduler/`,
//! `vae/`, `text_encoder/`, `tokenizer/`): what training reads of it today, the UNet's
//! config and weights and the scheduler's noise process.

use std::path::{Path, PathBuf};

use lisa_core::Prediction;
use lisa_core::schedule::BetaSchedule;
use serde_json::{Map, Value};

use super::folder::read_json_config;
use crate::error::Result;
use crate::scheduler::NoiseConfig;
use crate::weights::bad;

/// The parts of a pipeline folder training uses.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The folder.
    pub root: PathBuf,
    /// `unet/config.json`.
    pub unet: Map<String, Value>,
    /// The training noise process of `scheduler/scheduler_config.json`.
    pub noise: NoiseConfig,
    /// Its `prediction_type`.
    pub prediction: Prediction,
}

impl Pipeline {
    /// Reads `root/unet/config.json` and `root/scheduler/scheduler_config.json`; a missing
    /// component or an unsupported scheduler setting is an error naming it.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(bad(root, "no such diffusers pipeline folder"));
        }
        for part in ["unet", "scheduler"] {
            if !root.join(part).is_dir() {
                return Err(bad(root, format!("is not a diffusers pipeline folder: it has no {part}/")));
            }
        }
        let unet = read_json_config(&root.join("unet"))?;
        let path = root.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(crate::weights::io(&path))?;
        let scheduler: Map<String, Value> = match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => m,
            _ => return Err(bad(&path, "is not a JSON object")),
        };
        let (noise, prediction) = noise_of(&path, &scheduler)?;
        Ok(Self { root: root.to_path_buf(), unet, noise, prediction })
    }

    /// The UNet's folder.
    pub fn unet_dir(&self) -> PathBuf {
        self.root.join("unet")
    }
}

/// diffusers' scheduler config → lisa's noise process and prediction.
fn noise_of(path: &Path, c: &Map<String, Value>) -> Result<(NoiseConfig, Prediction)> {
    let num = |k: &str, default: f64| -> Result<f64> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| bad(path, format!("{k} = {v} is not a number"))),
        }
    };
    let text = |k: &str, default: &str| -> Result<String> {
        match c.get(k) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(bad(path, format!("{k} = {v} is not a string"))),
        }
    };
    let (start, end) = (num("beta_start", 0.0001)?, num("beta_end", 0.02)?);
    let betas = match text("beta_schedule", "linear")?.as_str() {
        "linear" => BetaSchedule::Linear { start, end },
        "scaled_linear" => BetaSchedule::ScaledLinear { start, end },
        "squaredcos_cap_v2" => BetaSchedule::COSINE,
        other => {
            return Err(bad(
                path,
                format!("beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
            ));
        }
    };
    if c.get("trained_betas").is_some_and(|v| !v.is_null()) {
        return Err(bad(path, "trained_betas is not supported"));
    }
    if c.get("rescale_betas_zero_snr").and_then(Value::as_bool) == Some(true) {
        return Err(bad(path, "rescale_betas_zero_snr = true is not supported"));
    }
    let steps = num("num_train_timesteps", 1000.0)?;
    if !(steps >= 2.0 && steps.fract() == 0.0 && steps <= 1e6) {
        return Err(bad(path, format!("num_train_timesteps = {steps} is not a count of steps")));
    }
    let prediction = match text("prediction_type", "epsilon")?.as_str() {
        "epsilon" => Prediction::Epsilon,
        "v_prediction" => Prediction::V,
        "sample" => Prediction::Sample,
        other => {
            return Err(bad(
                path,
                format!("prediction_type {other:?} is not supported (epsilon, v_prediction, sample)"),
            ));
        }
    };
    Ok((NoiseConfig::Diffusion { betas, num_train_timesteps: steps as usize }, prediction))
}
