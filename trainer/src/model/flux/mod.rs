//! Flux: diffusers' `FluxTransformer2DModel` (double-stream MMDiT blocks, then single-stream
//! blocks, rotary positions over (text, row, column), timestep + guidance + pooled-text
//! modulation, packed 2×2 latents; the frozen main network of a flow-matching model) and
//! `FluxControlNetModel` (the side network, union mode included), built from their
//! `config.json` and loaded from diffusers folders with diffusers' tensor names.
//!
//! The trainable `flux` architecture ([`FluxModel`]) joins them with the LISA decoder hooked at
//! `block_i` or `single_block_i`.

mod block;
mod config;
mod controlnet;
mod embed;
mod model;
mod pipeline;
mod text;
mod transformer;

use std::path::Path;

use lisa_core::backend::Backend;

pub use block::SingleBlock;
pub use config::{FLUX_NORM_EPS, FluxConfig, FluxControlNetExtras, ROPE_THETA};
pub use controlnet::{FluxControlNet, FluxControlOutput};
pub use embed::{Embedded, FluxEmbeddings, FluxInputs, pack, position_ids, rotary, unpack};
pub use model::{
    ACTIVATIONS_PER_BLOCK, DEFAULT_CONTROLNET_LAYERS, DEFAULT_GUIDANCE_SCALE, DEFAULT_HOOK, DEFAULT_LATENT_SIZE,
    FluxModel, FluxSpec, NAME,
};
pub use pipeline::{DEFAULT_RESOLUTION, FluxPipeline};
pub use text::FluxTextEncoders;
pub use transformer::{FluxResiduals, FluxTransformer};

use super::sd::read_diffusers_weights;
use crate::error::Result;
use crate::params::{ParamStore, Scope};
use crate::weights::load_tensors;

/// Loads the diffusers weights at `path` (a folder, single file or sharded) into the
/// parameters under `at`. Every tensor is checked (names, shapes, values); nothing is loaded
/// on an error. Returns how many tensors were loaded.
pub fn load_weights<B: Backend>(store: &mut ParamStore<B>, at: impl Into<Scope>, path: &Path) -> Result<usize> {
    let at = at.into();
    let (file, tensors) = read_diffusers_weights(path)?;
    let tensors = tensors.into_iter().map(|(k, v)| (at.name(k), v)).collect();
    load_tensors(store, &file, tensors, |n| at.contains(n), |_| false)
}

/// diffusers' `from_transformer`: the ControlNet under `side` takes the transformer's (under
/// `main`) embeddings and first blocks of each kind; its `controlnet_*` parameters stay as
/// they are (zero, or union mode's embedding). Returns how many tensors were copied.
pub fn copy_transformer_into_controlnet<B: Backend>(
    store: &mut ParamStore<B>,
    main: impl Into<Scope>,
    side: impl Into<Scope>,
) -> Result<usize> {
    crate::model::sd3::copy_shared_parameters(store, main, side, &["controlnet_"])
}
