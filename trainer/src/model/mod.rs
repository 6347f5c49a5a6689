//! The dual-branch model: frozen main UNet + trainable ControlNet side + (training only)
//! the LISA decoder, all parameters in one [`ParamStore`] under `main.`, `side.`, `lisa.`.

mod config;
mod controlnet;
mod decoder;
mod unet;

pub use config::{ControlConfig, DecoderConfig, HookLayer, UNetConfig};
pub use controlnet::{ControlNet, SideOutput};
pub use decoder::LisaDecoder;
pub use unet::{Conditioning, Encoder, EncoderOutput, Residuals, TimeEmbedding, UNet};

use lisa_core::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, ParamStore};

/// The whole model's configuration (serde: TOML/JSON sections `unet`, `control`, `decoder`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// The main network.
    pub unet: UNetConfig,
    /// The side network.
    pub control: ControlConfig,
    /// The LISA decoder (built only when training with LISA).
    pub decoder: DecoderConfig,
}

/// What a training forward returns.
pub struct TrainOutputs<B: Backend> {
    /// The controlled prediction `M(x_t; + r)` (records the graph through the residuals).
    pub pred: Var<B>,
    /// The hooked pre-zero-conv side feature `h`.
    pub hooked: Var<B>,
    /// `D(h, t)` for the LISA samples, when the decoder exists and LISA is on.
    pub decoded: Option<Var<B>>,
    /// The prior prediction `M(x_t)` of the LISA samples, without residuals (no gradient).
    pub prior: Option<B::Tensor>,
}

/// Main + side (+ decoder).
pub struct DualModel<B: Backend> {
    /// Every parameter.
    pub store: ParamStore<B>,
    /// The frozen main network.
    pub main: UNet,
    /// The trainable side network.
    pub side: ControlNet,
    /// The LISA decoder (None: baseline training, or inference).
    pub decoder: Option<LisaDecoder>,
    /// The configuration it was built from.
    pub config: ModelConfig,
}

impl<B: Backend> DualModel<B> {
    /// Builds the model with seeded initial weights; the side network starts as a copy of
    /// the main encoder, middle and embeddings. `with_decoder` builds the LISA decoder.
    pub fn new(config: &ModelConfig, with_decoder: bool, device: B::Device, seed: u64) -> Result<Self> {
        let mut store = ParamStore::new(device, seed);
        let main = UNet::new(&mut store, "main", &config.unet, false)?;
        let side = ControlNet::new(&mut store, "side", &config.unet, &config.control)?;
        let decoder = if with_decoder {
            let u = &config.unet;
            let (c_h, r_h) = match config.decoder.hook {
                HookLayer::Mid => (*u.channels.last().unwrap_or(&0), u.level_resolution(u.channels.len() - 1)),
                HookLayer::Down(i) if i < u.channels.len() => (u.channels[i], u.level_resolution(i)),
                HookLayer::Down(i) => {
                    return Err(TrainError::Config(format!(
                        "hook down_{i} does not exist: levels are down_0..down_{}",
                        u.channels.len() - 1
                    )));
                }
            };
            Some(LisaDecoder::new(&mut store, "lisa", &config.decoder, u, c_h, r_h)?)
        } else {
            None
        };
        let mut model = Self { store, main, side, decoder, config: config.clone() };
        model.copy_main_into_side()?;
        Ok(model)
    }

    /// Loads a pretrained main model (safetensors with exactly the `main.*` tensors, as
    /// [`crate::pretrain::Pretrainer::export`] writes) and re-initialises the side network as
    /// its copy. Returns the number of tensors loaded.
    pub fn load_main(&mut self, path: &std::path::Path) -> Result<usize> {
        let n = crate::checkpoint::load_params(&mut self.store, path, |n| n.starts_with("main."), |n| n.to_string())?;
        self.copy_main_into_side()?;
        Ok(n)
    }

    /// Loads trained side-network (and, when this model has one, decoder) weights from a
    /// training checkpoint's `model.safetensors`; decoder tensors are skipped when the model
    /// was built without the decoder (inference).
    pub fn load_trained(&mut self, path: &std::path::Path) -> Result<usize> {
        let with_decoder = self.decoder.is_some();
        crate::checkpoint::load_params_ignoring(
            &mut self.store,
            path,
            |n| n.starts_with("side.") || (with_decoder && n.starts_with("lisa.")),
            |n| n.to_string(),
            |n| !with_decoder && n.starts_with("lisa."),
        )
    }

    /// ControlNet initialisation: `side.{time,encoder}.*` ← `main.{time,encoder}.*`.
    pub fn copy_main_into_side(&mut self) -> Result<()> {
        let pairs: Vec<_> = self
            .store
            .iter()
            .filter_map(|(id, p)| {
                let rest = p.name.strip_prefix("main.")?;
                (rest.starts_with("time.") || rest.starts_with("encoder.")).then(|| (id, format!("side.{rest}")))
            })
            .collect();
        for (src, dst_name) in pairs {
            let dst = self
                .store
                .find(&dst_name)
                .ok_or_else(|| TrainError::Config(format!("side network has no {dst_name}")))?;
            let value = self.store.get(src).value.clone();
            self.store.get_mut(dst).value = value;
        }
        Ok(())
    }

    /// The training forward (lisa-method.md §3 steps 3–6, §5). The main encoder runs under
    /// no-grad (frozen weights, `x_t` needs no gradient); the controlled up path records only
    /// through the residuals; with `lisa`, the prior re-runs only the up path, without
    /// residuals and without recording, reusing the encoder activations.
    ///
    /// `lisa_samples` (≤ batch) restricts the LISA term (prior pass and decoder) to the first
    /// that many samples of the batch: a cost option, not in the paper (None = all).
    pub fn forward_train(
        &self,
        p: &Bound<'_, B>,
        x_t: &Var<B>,
        hint: &Var<B>,
        cond: &Conditioning,
        lisa: bool,
        lisa_samples: Option<usize>,
    ) -> Result<TrainOutputs<B>> {
        let tape = p.tape;
        let (temb, enc) = tape.no_grad(|| -> Result<_> {
            let temb = self.main.time.forward(p, cond)?;
            let enc = self.main.encoder.forward(p, x_t, &temb, None)?;
            Ok((temb, enc))
        })?;
        let side = self.side.forward(p, x_t, hint, cond)?;
        let pred = self.main.decode(p, &enc, Some((&side.residuals, self.side.conditioning_scale)), &temb)?;
        let hook = self.config.decoder.hook;
        let hooked = side.feature(hook)?.clone();
        let (decoded, prior) = match (&self.decoder, lisa) {
            (Some(d), true) => {
                let n = cond.t.len();
                let k = lisa_samples.unwrap_or(n);
                if k == 0 || k > n {
                    return Err(TrainError::Config(format!("lisa sub-batch {k} must lie in 1..={n}")));
                }
                let prior = tape.no_grad(|| -> Result<_> {
                    let sub = |v: &Var<B>| tape.slice_batch(v, k);
                    let levels = enc.levels.iter().map(sub).collect::<Result<_>>()?;
                    let enc_k = EncoderOutput { levels, mid: sub(&enc.mid)? };
                    self.main.decode(p, &enc_k, None, &sub(&temb)?)
                })?;
                let h_k = tape.slice_batch(&hooked, k)?;
                (Some(d.forward(p, &h_k, &cond.t[..k])?), Some(prior.value))
            }
            (None, true) => {
                return Err(TrainError::Config("LISA training needs a model built with the decoder".into()));
            }
            (_, false) => (None, None),
        };
        Ok(TrainOutputs { pred, hooked, decoded, prior })
    }

    /// Inference: the controlled prediction only (no decoder, no prior pass), with the
    /// residuals multiplied by `control_scale` (1 = as trained, 0 = the main model alone).
    pub fn predict(
        &self,
        p: &Bound<'_, B>,
        x_t: &Var<B>,
        hint: &Var<B>,
        cond: &Conditioning,
        control_scale: f32,
    ) -> Result<Var<B>> {
        let temb = self.main.time.forward(p, cond)?;
        let enc = self.main.encoder.forward(p, x_t, &temb, None)?;
        let side = self.side.forward(p, x_t, hint, cond)?;
        self.main.decode(p, &enc, Some((&side.residuals, control_scale)), &temb)
    }
}
