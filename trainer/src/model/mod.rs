//! The model seam: what the trainer, the samplers and the checkpoints know of a model.
//!
//! A dual-branch denoiser ([`DualDenoiser`]) is a frozen main network split at the place
//! where a ControlNet enters it (the encoder, run once; the decoder, run with or without
//! side residuals), a trainable side network that returns those residuals and the
//! pre-zero-conv features the LISA hooks name, and the LISA decoder. Every parameter lives in
//! one [`ParamStore`] under three prefixes: [`MAIN`], [`SIDE`], [`DECODER`].
//!
//! Adding an architecture: a folder under `model/` (see [`toy`]) whose type holds a
//! [`DualParts`] and implements [`DualDenoiser`], one row of [`registry::ARCHITECTURES`] (with
//! its default LISA hook) and one constructor arm in [`registry::build`].

mod conditioning;
mod decoder;
mod dual;
pub mod flux;
mod forward;
mod hook;
pub mod registry;
pub mod sd;
pub mod sd3;
pub mod t5;
pub mod toy;

use std::path::Path;

use lisa_core::Prediction;
use lisa_core::backend::Backend;

pub use conditioning::{Conditioning, PromptEmbedding};
pub use decoder::{DecoderConfig, LisaDecoder, OutputInit};
pub use dual::DualParts;
pub use forward::{
    ForwardOptions, SideLeaves, SideMode, TrainOutputs, forward_prior, forward_train, predict, replay_side,
};
pub use hook::HookLayer;
pub use registry::{ModelSpec, Parts};

use crate::autodiff::{Tape, Var};
use crate::error::{Result, TrainError};
use crate::params::{Bound, ParamStore};

/// Name prefix of the frozen main network's parameters.
pub const MAIN: &str = "main.";
/// Name prefix of the side network's parameters.
pub const SIDE: &str = "side.";
/// Name prefix of the LISA decoder's parameters.
pub const DECODER: &str = "lisa.";
/// The folder name of a side network in its architecture's native format, in a run's
/// output folder and in each of its checkpoints ([`DualDenoiser::export_side`]).
pub const NATIVE_SIDE_DIR: &str = "controlnet";
/// The folder name of the side network's EMA weights in the native format (a run with EMA),
/// beside [`NATIVE_SIDE_DIR`].
pub const EMA_SIDE_DIR: &str = "controlnet_ema";

/// Tensors with one entry per place the side network enters the main network: the main
/// encoder's skips, the side network's residuals, and its pre-zero-conv features.
///
/// A UNet has one per skip connection (`down`) and one for the middle block (`mid`). A
/// transformer has one per side block in `down` (hooks `block_i`; Flux's single-stream
/// blocks in `single`, hooks `single_block_i`) and no `mid`; its main encoding keeps the
/// tokens entering the first block as `mid`.
#[derive(Debug, Clone)]
pub struct Skips<B: Backend> {
    /// Per skip (`down_i`), in the order the main decoder consumes them from the deepest; or
    /// per transformer block (`block_i`).
    pub down: Vec<Var<B>>,
    /// The middle block's (None: a transformer's side network has no middle block).
    pub mid: Option<Var<B>>,
    /// Per single-stream transformer block (`single_block_i`; empty but for Flux).
    pub single: Vec<Var<B>>,
}

impl<B: Backend> Skips<B> {
    /// A UNet's skips and middle block.
    pub fn unet(down: Vec<Var<B>>, mid: Var<B>) -> Self {
        Self { down, mid: Some(mid), single: Vec::new() }
    }

    /// A transformer side network's: one per block (`down`) and per single-stream block.
    pub fn blocks(down: Vec<Var<B>>, single: Vec<Var<B>>) -> Self {
        Self { down, mid: None, single }
    }

    /// The middle block's tensor, which a UNet always has.
    pub fn mid(&self) -> Result<&Var<B>> {
        self.mid.as_ref().ok_or(TrainError::Internal("a UNet's skips have a middle block"))
    }

    /// Every tensor: `down` in order, then `mid` when there is one, then `single`.
    pub fn all(&self) -> impl Iterator<Item = &Var<B>> {
        self.down.iter().chain(self.mid.as_ref()).chain(&self.single)
    }

    /// `f` of every tensor, in the same places.
    pub fn try_map(&self, f: impl Fn(&Var<B>) -> Result<Var<B>>) -> Result<Self> {
        Ok(Self {
            down: self.down.iter().map(&f).collect::<Result<_>>()?,
            mid: self.mid.as_ref().map(&f).transpose()?,
            single: self.single.iter().map(&f).collect::<Result<_>>()?,
        })
    }
}

/// What the side network adds to the main decoder (after the zero convs).
pub type Residuals<B> = Skips<B>;

/// What the side network returns.
#[derive(Debug, Clone)]
pub struct SideOutput<B: Backend> {
    /// After the zero convs: what the main decoder adds.
    pub residuals: Residuals<B>,
    /// Before the zero convs: what the LISA hooks read.
    pub features: Skips<B>,
}

impl<B: Backend> SideOutput<B> {
    /// The pre-zero-conv feature a hook names.
    pub fn feature(&self, hook: HookLayer) -> Result<&Var<B>> {
        match hook {
            HookLayer::Mid => {
                self.features.mid.as_ref().ok_or_else(|| TrainError::Config("this side network has no mid hook".into()))
            }
            HookLayer::Down(i) | HookLayer::Block(i) => self.features.down.get(i).ok_or_else(|| {
                TrainError::Config(format!(
                    "hook {hook} does not exist: the side network has {} hooked layers",
                    self.features.down.len()
                ))
            }),
            HookLayer::SingleBlock(i) => self.features.single.get(i).ok_or_else(|| {
                TrainError::Config(format!(
                    "hook {hook} does not exist: the side network has {} single-stream blocks",
                    self.features.single.len()
                ))
            }),
        }
    }
}

/// The main encoder's activations, computed once per forward and consumed by the main
/// decoder (with residuals for the controlled prediction, without for the LISA prior).
/// Every tensor is batch-first.
#[derive(Debug, Clone)]
pub struct MainEncoding<B: Backend> {
    /// The time (and, where the architecture has one, class or text-pooled) embedding the
    /// decoder's blocks read, `[n, d]`.
    pub temb: Var<B>,
    /// The prompt context the decoder's cross-attention reads (`[n, tokens, d]`; None for an
    /// architecture without cross-attention).
    pub context: Option<Var<B>>,
    /// The encoder's skips and the middle block's output.
    pub skips: Skips<B>,
}

impl<B: Backend> MainEncoding<B> {
    /// The first `k` samples of every tensor (the LISA sub-batch).
    pub fn slice_batch(&self, tape: &Tape<B>, k: usize) -> Result<Self> {
        let slice = |v: &Var<B>| tape.slice_batch(v, k);
        Ok(Self {
            temb: slice(&self.temb)?,
            context: self.context.as_ref().map(slice).transpose()?,
            skips: self.skips.try_map(slice)?,
        })
    }
}

/// A dual-branch denoiser: the frozen main network `M`, the side network `S` and the LISA
/// decoder `D` (docs/method.md §1, §3, §5). The controlled prediction is
/// `M_dec(M_enc(x_t), scale·S(x_t, c))`, the prior `M_dec(M_enc(x_t))`.
pub trait DualDenoiser<B: Backend> {
    /// The registry name of the architecture (`"toy"`).
    fn architecture(&self) -> &'static str;
    /// Its full configuration (with every default filled in), as checkpoints record it.
    fn spec(&self) -> ModelSpec;
    /// The parameter store, parts and LISA decoder every architecture holds.
    fn dual(&self) -> &DualParts<B>;
    /// The same, mutably.
    fn dual_mut(&mut self) -> &mut DualParts<B>;
    /// Every parameter.
    fn store(&self) -> &ParamStore<B> {
        &self.dual().store
    }
    /// Every parameter, mutably (optimizer updates, loads).
    fn store_mut(&mut self) -> &mut ParamStore<B> {
        &mut self.dual_mut().store
    }
    /// The parts it was built with.
    fn parts(&self) -> Parts {
        self.dual().parts
    }
    /// `[channels, height, width]` of `x_t` and of the prediction.
    fn sample_shape(&self) -> [usize; 3];
    /// Channels of the condition image.
    fn hint_channels(&self) -> usize;
    /// `[channels, height, width]` of the condition image: by default the sample's sides
    /// (the toy); SD's ControlNet reads images 8× the latent's side.
    fn hint_shape(&self) -> [usize; 3] {
        let [_, h, w] = self.sample_shape();
        [self.hint_channels(), h, w]
    }
    /// Whether samples are latents (of a VAE the model does not hold) rather than pixels:
    /// such a model trains on precomputed latents, and its samples need the VAE to be seen.
    fn latent_space(&self) -> bool {
        false
    }
    /// Whether the side network reads the condition as VAE latents (SD3's ControlNet) rather
    /// than as an image: such a model trains on precomputed condition latents.
    fn latent_hints(&self) -> bool {
        false
    }
    /// What the main network predicts.
    fn prediction(&self) -> Prediction;
    /// The residual multiplier training uses.
    fn conditioning_scale(&self) -> f32;
    /// Turns prompts into what the network is conditioned on; `""` is the null prompt
    /// (classifier-free guidance). Prompts the model cannot read are an error naming them.
    fn embed_prompts(&self, prompts: &[&str]) -> Result<PromptEmbedding>;
    /// *Default*: checks that every one of `prompts` can be embedded (the error
    /// [`embed_prompts`](Self::embed_prompts) would give for the first that cannot) without
    /// holding the embeddings of all: the distinct prompts, a few at a time. Models that read
    /// precomputed tables check the tables' names only.
    fn check_prompts(&self, prompts: &[&str]) -> Result<()> {
        let distinct: Vec<&str> =
            prompts.iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for chunk in distinct.chunks(8) {
            self.embed_prompts(chunk)?;
        }
        Ok(())
    }
    /// `M_enc`: the main encoder (with the time and prompt embedding) on `x_t`.
    fn encode_main(&self, p: &Bound<'_, B>, x_t: &Var<B>, cond: &Conditioning) -> Result<MainEncoding<B>>;
    /// `M_dec`: the main decoder over `enc`, adding `scale·residuals` when given: the only
    /// place the side network enters the main network.
    fn decode_main(
        &self,
        p: &Bound<'_, B>,
        enc: &MainEncoding<B>,
        residuals: Option<(&Residuals<B>, f32)>,
    ) -> Result<Var<B>>;
    /// `S`: the side network on `x_t` and the condition image `hint [n, c_hint, h, w]`.
    fn side(&self, p: &Bound<'_, B>, x_t: &Var<B>, hint: &Var<B>, cond: &Conditioning) -> Result<SideOutput<B>>;
    /// The hook the LISA decoder reads (None: built without the decoder).
    fn lisa_hook(&self) -> Option<HookLayer> {
        self.dual().lisa_hook()
    }
    /// `D(h, t)`: the LISA decoder on the hooked feature, at the prediction's shape.
    fn decode_lisa(&self, p: &Bound<'_, B>, feature: &Var<B>, t: &[f32]) -> Result<Var<B>> {
        self.dual().decode_lisa(p, feature, t)
    }
    /// Loads the pretrained main network (and initialises the side network from it, as
    /// ControlNet does). Returns the number of tensors read.
    fn load_main(&mut self, path: &Path) -> Result<usize>;
    /// Loads trained side (and, when built, decoder) weights written by a training
    /// checkpoint. Returns the number of tensors read.
    fn load_trained(&mut self, path: &Path) -> Result<usize> {
        self.dual_mut().load_trained(path)
    }
    /// Loads a side network saved in the architecture's native format (a diffusers
    /// ControlNet folder for sd), to continue training it. Returns the number of tensors.
    fn load_side(&mut self, path: &Path) -> Result<usize> {
        Err(TrainError::Config(format!(
            "the {} architecture has no native side-network format to load {} from",
            self.architecture(),
            path.display()
        )))
    }
    /// Writes the side network in the architecture's native format into `dir` (a diffusers
    /// ControlNet folder for sd). Returns false when the architecture has none.
    fn export_side(&self, _dir: &Path) -> Result<bool> {
        Ok(false)
    }
}
