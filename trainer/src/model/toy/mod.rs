//! The toy architecture (`architecture = "toy"`): a pixel-space UNet with class-embedded
//! prompts (fill and background colour of the fill-circles task), its ControlNet side
//! network and the LISA decoder. The fast demo and test vehicle of the project.
//!
//! Parameter names: `main.{time,encoder,up,norm_out,conv_out}.*`,
//! `side.{time,hint,encoder,zero_convs,zero_mid}.*`, `lisa.*`.

mod config;
mod controlnet;
mod unet;

use std::path::Path;

use lisa_core::Prediction;
use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

pub use config::{ControlConfig, UNetConfig};
pub use controlnet::ControlNet;
pub use unet::{Encoder, TimeEmbedding, UNet};

use super::{
    Conditioning, DECODER, DecoderConfig, DualDenoiser, DualParts, HookLayer, LisaDecoder, MAIN, MainEncoding,
    ModelSpec, Parts, PromptEmbedding, Residuals, SIDE, SideOutput,
};
use crate::autodiff::Var;
use crate::data::prompt_colours;
use crate::error::{Result, TrainError};
use crate::params::{Bound, Scope};
use crate::weights::{MODEL_SPEC_KEY, load_tensors, parse_safetensors};

/// The registry name.
pub const NAME: &str = "toy";
/// The side layer the LISA decoder reads when the run file names none (the second level of the reference network).
pub const DEFAULT_HOOK: HookLayer = HookLayer::Down(1);

/// The toy's own configuration: `[model.unet]` and `[model.control]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToyConfig {
    /// The main network.
    pub unet: UNetConfig,
    /// The side network.
    pub control: ControlConfig,
}

impl ToyConfig {
    /// Reads the architecture keys of `spec` (unknown keys are errors naming them).
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        serde_json::from_value(serde_json::Value::Object(spec.config.clone()))
            .map_err(|e| TrainError::Config(format!("[model] of the toy architecture: {e}")))
    }

    /// This configuration as the `config` of a [`ModelSpec`] (through JSON text, so that
    /// f32 values compare equal with what a checkpoint's `state.json` holds).
    pub fn to_spec(&self, decoder: &DecoderConfig) -> ModelSpec {
        let text = serde_json::to_string(self).unwrap_or_default();
        let config = match serde_json::from_str(&text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        };
        ModelSpec { architecture: NAME.to_string(), decoder: decoder.clone(), config }
    }

    /// Checks sizes and that the hook names a level of this network.
    pub fn validate(&self, decoder: &DecoderConfig) -> Result<()> {
        self.unet.validate()?;
        self.hook_shape(decoder.hook_or(DEFAULT_HOOK)).map(|_| ())
    }

    /// `(channels, side)` of the side feature a hook reads.
    fn hook_shape(&self, hook: HookLayer) -> Result<(usize, usize)> {
        let u = &self.unet;
        let levels = u.channels.len();
        match hook {
            HookLayer::Mid => Ok((u.channels[levels - 1], u.level_resolution(levels - 1))),
            HookLayer::Down(i) if i < levels => Ok((u.channels[i], u.level_resolution(i))),
            HookLayer::Down(i) => {
                Err(TrainError::Config(format!("hook down_{i} does not exist: levels are down_0..down_{}", levels - 1)))
            }
            HookLayer::Block(_) | HookLayer::SingleBlock(_) => {
                Err(TrainError::Config(format!("hook {hook}: the toy's hooks are down_0..down_{} and mid", levels - 1)))
            }
        }
    }
}

/// The toy dual-branch model.
pub struct ToyModel<B: Backend> {
    dual: DualParts<B>,
    main: UNet,
    side: Option<ControlNet>,
    config: ToyConfig,
}

impl<B: Backend> ToyModel<B> {
    /// Builds the parts of `spec` with seeded initial weights; the side network starts as a
    /// copy of the main encoder, middle and embeddings.
    pub fn new(spec: &ModelSpec, parts: Parts, device: B::Device, seed: u64) -> Result<Self> {
        let config = ToyConfig::from_spec(spec)?;
        config.validate(&spec.decoder)?;
        let mut store = DualParts::new_store(device, seed, parts);
        let main = UNet::new(&mut store, MAIN, &config.unet)?;
        let (mut side, mut decoder) = (None, None);
        if let Parts::Dual { decoder: with_decoder } = parts {
            side = Some(ControlNet::new(&mut store, SIDE, &config.unet, &config.control)?);
            if with_decoder {
                let hooked = config.hook_shape(spec.decoder.hook_or(DEFAULT_HOOK))?;
                let out = (config.unet.image_channels, config.unet.resolution);
                decoder = Some(LisaDecoder::new(&mut store, DECODER, &spec.decoder, hooked, out)?);
            }
        }
        let mut model = Self {
            dual: DualParts { store, parts, decoder, decoder_config: spec.decoder.resolved(DEFAULT_HOOK) },
            main,
            side,
            config,
        };
        model.copy_main_into_side()?;
        Ok(model)
    }

    /// ControlNet initialisation: `side.{time,encoder}.*` ← `main.{time,encoder}.*`.
    fn copy_main_into_side(&mut self) -> Result<()> {
        if self.side.is_none() {
            return Ok(());
        }
        let side = Scope::from(SIDE);
        let pairs: Vec<_> = self
            .dual
            .store
            .iter()
            .filter_map(|(id, p)| {
                let rest = p.name.strip_prefix(MAIN)?;
                (rest.starts_with("time.") || rest.starts_with("encoder.")).then(|| (id, side.name(rest)))
            })
            .collect();
        for (src, dst_name) in pairs {
            let dst = self
                .dual
                .store
                .find(&dst_name)
                .ok_or_else(|| TrainError::Config(format!("side network has no {dst_name}")))?;
            let value = self.dual.store.get(src).value.clone();
            self.dual.store.get_mut(dst).value = value;
        }
        Ok(())
    }

    fn side_net(&self) -> Result<&ControlNet> {
        self.side.as_ref().ok_or_else(|| TrainError::Config("this model was built without the side network".into()))
    }
}

impl<B: Backend> DualDenoiser<B> for ToyModel<B> {
    fn dual(&self) -> &DualParts<B> {
        &self.dual
    }

    fn dual_mut(&mut self) -> &mut DualParts<B> {
        &mut self.dual
    }

    fn architecture(&self) -> &'static str {
        NAME
    }

    fn spec(&self) -> ModelSpec {
        self.config.to_spec(&self.dual.decoder_config)
    }

    fn sample_shape(&self) -> [usize; 3] {
        let u = &self.config.unet;
        [u.image_channels, u.resolution, u.resolution]
    }

    fn hint_channels(&self) -> usize {
        self.config.control.hint_channels
    }

    fn prediction(&self) -> Prediction {
        self.config.unet.prediction
    }

    fn conditioning_scale(&self) -> f32 {
        self.config.control.conditioning_scale
    }

    /// `"<fill> circle with <background> background"` → the two colour ids (a colour
    /// outside the palette, or `""`, gives the null id).
    fn embed_prompts(&self, prompts: &[&str]) -> Result<PromptEmbedding> {
        let classes = &self.config.unet.prompt_classes;
        let mut ids = vec![Vec::with_capacity(prompts.len()); classes.len()];
        for prompt in prompts {
            let colours = prompt_colours(prompt).map_err(|e| TrainError::Mismatch(e.to_string()))?;
            for (k, list) in ids.iter_mut().enumerate() {
                let null = classes[k] - 1;
                list.push(colours.get(k).copied().flatten().filter(|&c| c < null).unwrap_or(null));
            }
        }
        Ok(PromptEmbedding::Classes(ids))
    }

    fn encode_main(&self, p: &Bound<'_, B>, x_t: &Var<B>, cond: &Conditioning) -> Result<MainEncoding<B>> {
        let temb = self.main.time.forward(p, cond)?;
        let enc = self.main.encoder.forward(p, x_t, &temb, None)?;
        Ok(MainEncoding { temb, context: None, skips: enc })
    }

    fn decode_main(
        &self,
        p: &Bound<'_, B>,
        enc: &MainEncoding<B>,
        residuals: Option<(&Residuals<B>, f32)>,
    ) -> Result<Var<B>> {
        self.main.decode(p, &enc.skips, residuals, &enc.temb)
    }

    fn side(&self, p: &Bound<'_, B>, x_t: &Var<B>, hint: &Var<B>, cond: &Conditioning) -> Result<SideOutput<B>> {
        self.side_net()?.forward(p, x_t, hint, cond)
    }

    /// Reads a prior file (exactly the `main.*` tensors, as `lisa pretrain` writes them); one
    /// that records another model (its `lisa.model_spec` metadata) is refused.
    fn load_main(&mut self, path: &Path) -> Result<usize> {
        let bytes = std::fs::read(path).map_err(|error| TrainError::Io { path: path.to_path_buf(), error })?;
        let file = parse_safetensors(path, &bytes)?;
        if let Some(json) = file.metadata.get(MODEL_SPEC_KEY) {
            let theirs: ModelSpec = serde_json::from_str(json).map_err(|e| TrainError::File {
                path: path.to_path_buf(),
                reason: format!("its {MODEL_SPEC_KEY} metadata is not a model description ({e})"),
            })?;
            if theirs.architecture != NAME || ToyConfig::from_spec(&theirs)? != self.config {
                let diff = crate::differences::differences(
                    &serde_json::Value::Object(theirs.config.clone()),
                    &serde_json::Value::Object(self.spec().config),
                );
                return Err(TrainError::File {
                    path: path.to_path_buf(),
                    reason: format!(
                        "this prior is another model than the one configured ({}: prior vs configured); leave the model settings out of the run file to use the prior's",
                        if theirs.architecture != NAME {
                            format!("architecture {} vs {NAME}", theirs.architecture)
                        } else {
                            diff.join(", ")
                        }
                    ),
                });
            }
        }
        let n = load_tensors(&mut self.dual.store, path, file.tensors, |n| n.starts_with(MAIN), |_| false)?;
        self.copy_main_into_side()?;
        Ok(n)
    }
}
