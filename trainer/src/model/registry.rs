//! The architectures `lisa` can build, by name: the one place a new architecture is
//! registered.

use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

use super::{DecoderConfig, DualDenoiser, HookLayer, flux, sd, sd3, toy};
use crate::error::{Result, TrainError};

/// A model as run files and checkpoints describe it: the architecture's name, the LISA
/// decoder's settings (the same for every architecture) and the architecture's own
/// configuration (every other key of the `[model]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Registry name (`"toy"`, the default).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// The LISA decoder (`[model.decoder]`).
    #[serde(default)]
    pub decoder: DecoderConfig,
    /// The architecture's own keys (for the toy: `[model.unet]`, `[model.control]`).
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_architecture() -> String {
    toy::NAME.to_string()
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self { architecture: default_architecture(), decoder: DecoderConfig::default(), config: Default::default() }
    }
}

/// Which parts to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// The main network alone, every parameter trainable (pretraining the prior).
    Prior,
    /// Frozen main network + trainable side network, with the LISA decoder when `decoder`.
    Dual {
        /// Build the LISA decoder (LISA training; not baseline training or inference).
        decoder: bool,
    },
}

/// One registered architecture and its defaults.
#[derive(Debug, Clone, Copy)]
pub struct Architecture {
    /// The name run files select it by (`[model] architecture = "…"`).
    pub name: &'static str,
    /// What it is, in a few words.
    pub description: &'static str,
    /// The side layer the LISA decoder reads when the run file names none.
    pub default_hook: HookLayer,
    /// Checks a spec of this architecture without building it.
    validate: fn(&ModelSpec) -> Result<()>,
    /// Removes from the architecture's keys those that say where something was read from
    /// rather than what it was (a path whose contents a digest beside it pins).
    locations: fn(&mut serde_json::Map<String, serde_json::Value>),
}

/// The registered architectures: the one place a new architecture is added (and one arm of
/// [`build`], whose constructors are generic over the backend).
pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: toy::NAME,
        description: "the reference pixel-space UNet + ControlNet of the fill-circles task",
        default_hook: toy::DEFAULT_HOOK,
        validate: |spec| toy::ToyConfig::from_spec(spec)?.validate(&spec.decoder),
        locations: |_| {},
    },
    Architecture {
        name: sd::NAME,
        description: "Stable Diffusion 1.x/2.x: diffusers' UNet2DConditionModel + ControlNetModel",
        default_hook: sd::DEFAULT_HOOK,
        validate: |spec| sd::SdSpec::from_spec(spec)?.validate(&spec.decoder),
        locations: sd::SdSpec::remove_locations,
    },
    Architecture {
        name: sd3::NAME,
        description: "Stable Diffusion 3 / 3.5 (flow matching): diffusers' SD3Transformer2DModel + SD3ControlNetModel",
        default_hook: sd3::DEFAULT_HOOK,
        validate: |spec| sd3::Sd3Spec::from_spec(spec)?.validate(&spec.decoder),
        locations: sd3::Sd3Spec::remove_locations,
    },
    Architecture {
        name: flux::NAME,
        description: "Flux (flow matching): diffusers' FluxTransformer2DModel + FluxControlNetModel",
        default_hook: flux::DEFAULT_HOOK,
        validate: |spec| flux::FluxSpec::from_spec(spec)?.validate(&spec.decoder),
        locations: flux::FluxSpec::remove_locations,
    },
];

/// The registered architecture called `name`.
pub fn architecture(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES.iter().find(|a| a.name == name).ok_or_else(|| {
        let known: Vec<&str> = ARCHITECTURES.iter().map(|a| a.name).collect();
        TrainError::Config(format!("unknown model architecture {name:?} (known: {})", known.join(", ")))
    })
}

/// Builds `spec` with seeded initial weights on `device`.
pub fn build<B: Backend>(
    spec: &ModelSpec,
    parts: Parts,
    device: B::Device,
    seed: u64,
) -> Result<Box<dyn DualDenoiser<B>>> {
    let arch = architecture(&spec.architecture)?;
    match arch.name {
        toy::NAME => Ok(Box::new(toy::ToyModel::new(spec, parts, device, seed)?)),
        sd::NAME => Ok(Box::new(sd::SdModel::new(spec, parts, device, seed)?)),
        sd3::NAME => Ok(Box::new(sd3::Sd3Model::new(spec, parts, device, seed)?)),
        flux::NAME => Ok(Box::new(flux::FluxModel::new(spec, parts, device, seed)?)),
        _ => Err(TrainError::Internal("every registered architecture has a constructor in registry::build")),
    }
}

/// Checks `spec` without building it (bad keys, values and sizes are errors naming them).
pub fn validate(spec: &ModelSpec) -> Result<()> {
    (architecture(&spec.architecture)?.validate)(spec)
}

impl ModelSpec {
    /// The hook the LISA decoder reads: the chosen one, or the architecture's default.
    pub fn hook(&self) -> Result<HookLayer> {
        Ok(self.decoder.hook_or(architecture(&self.architecture)?.default_hook))
    }

    /// What makes two specs the same model, as JSON: every key but those that only say where
    /// a file was read from (its digest stays), so that a moved or respelled folder is the
    /// same model and an edited file is not. An unknown architecture keeps every key.
    pub fn identity(&self) -> serde_json::Value {
        let mut spec = self.clone();
        if let Ok(arch) = architecture(&self.architecture) {
            (arch.locations)(&mut spec.config);
        }
        serde_json::to_value(spec).unwrap_or(serde_json::Value::Null)
    }
}

/// The model a weights file written by lisa records (its `lisa.model_spec` metadata), if any.
pub fn spec_of_weights(path: &std::path::Path) -> Result<Option<ModelSpec>> {
    let meta = crate::weights::read_metadata(path)?;
    match meta.get(crate::weights::MODEL_SPEC_KEY) {
        None => Ok(None),
        Some(json) => serde_json::from_str(json).map(Some).map_err(|e| TrainError::File {
            path: path.to_path_buf(),
            reason: format!("its {} metadata is not a model description ({e})", crate::weights::MODEL_SPEC_KEY),
        }),
    }
}
