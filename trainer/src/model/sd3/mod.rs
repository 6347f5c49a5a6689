//! Stable Diffusion 3 / 3.5: diffusers' `SD3Transformer2DModel` (MMDiT, the frozen main
//! network of a flow-matching model) and `SD3ControlNetModel` (the side network), built from
//! their `config.json` and loaded from diffusers folders with diffusers' tensor names.
//!
//! The trainable `sd3` architecture ([`Sd3Model`]) joins them with the LISA decoder hooked at
//! `block_i`; its pipeline with the text encoders builds on them.

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

pub use block::{
    BlockShape, GeluFeedForward, JointAttention, JointBlock, Modulation, SD3_NORM_EPS, gated, modulate,
    plain_layer_norm,
};
pub use config::{MAX_CHANNELS, MAX_LAYERS, MAX_WIDTH, QkNorm, Sd3Config, Sd3ControlNetExtras};
pub use controlnet::{Sd3ControlNet, Sd3ControlOutput};
pub use embed::{Embedded, PatchEmbed, Sd3Embeddings, Sd3Inputs, TimeTextEmbed, crop_positions, sincos_positions};
pub use model::{ACTIVATIONS_PER_BLOCK, DEFAULT_CONTROLNET_LAYERS, DEFAULT_HOOK, NAME, Sd3Model, Sd3Spec};
pub(crate) use model::{check_pooled_text, lookup_pooled_text, pooled_text_tensors, read_prompt_pair};
pub use pipeline::{Sd3Pipeline, Sd3Training};
pub(crate) use pipeline::{class_name, read_flow_folder};
pub use text::Sd3TextEncoders;
pub use transformer::{Sd3Transformer, unpatchify};

use super::sd::read_diffusers_weights;
use crate::error::Result;
use crate::params::{ParamStore, Scope};
use crate::weights::{bad, load_tensors};

/// The persistent buffer diffusers saves with the positions table.
pub const POSITIONS_BUFFER: &str = "pos_embed.pos_embed";

/// Loads the diffusers weights at `path` (a folder, single file or sharded) into the
/// parameters under `at`; `positions` is the table the model computed, which the file's
/// `pos_embed.pos_embed` buffer must match (a model with other positions is refused, not
/// silently recomputed). Every tensor is checked (names, shapes, values); nothing is loaded
/// on an error. Returns how many tensors were loaded.
pub fn load_weights<B: Backend>(
    store: &mut ParamStore<B>,
    at: impl Into<Scope>,
    path: &Path,
    positions: &[f32],
) -> Result<usize> {
    let at = at.into();
    let (file, mut tensors) = read_diffusers_weights(path)?;
    let (shape, values) =
        tensors.remove(POSITIONS_BUFFER).ok_or_else(|| bad(&file, format!("missing tensor {POSITIONS_BUFFER}")))?;
    if values.len() != positions.len() {
        return Err(bad(&file, format!("{POSITIONS_BUFFER} has shape {shape}, not the config's positions")));
    }
    let off = |(a, b): (&f32, &f32)| {
        let e = (a - b).abs();
        e.is_nan() || e > 1e-5
    };
    if let Some(i) = values.iter().zip(positions).position(off) {
        return Err(bad(
            &file,
            format!(
                "{POSITIONS_BUFFER} differs from diffusers' sin-cos table for this config ({} vs {} at {i}): not supported",
                values[i], positions[i]
            ),
        ));
    }
    let tensors = tensors.into_iter().map(|(k, v)| (at.name(k), v)).collect();
    load_tensors(store, &file, tensors, |n| at.contains(n), |_| false)
}

/// diffusers' `from_transformer`: the ControlNet under `side` takes the transformer's (under
/// `main`) patch embedding, time and text embedding, context embedder and first blocks; its
/// `pos_embed_input` and `controlnet_blocks` stay zero. Every copied tensor must exist on both
/// sides with one shape. Returns how many tensors were copied.
pub fn copy_transformer_into_controlnet<B: Backend>(
    store: &mut ParamStore<B>,
    main: impl Into<Scope>,
    side: impl Into<Scope>,
) -> Result<usize> {
    copy_shared_parameters(store, main, side, &["pos_embed_input.", "controlnet_blocks."])
}

/// Every parameter under `side` whose name (relative to it) does not start with one of
/// `kept` takes the value of the parameter of that name under `main`, which must exist with
/// the same shape (the copy of a `from_transformer`). Returns how many tensors were copied.
pub fn copy_shared_parameters<B: Backend>(
    store: &mut ParamStore<B>,
    main: impl Into<Scope>,
    side: impl Into<Scope>,
    kept: &[&str],
) -> Result<usize> {
    let (main, side) = (main.into(), side.into());
    let pairs: Vec<_> = store
        .iter()
        .filter(|(_, p)| side.contains(&p.name))
        .filter_map(|(dst, p)| {
            let rest = p.name[side.path().len()..].trim_start_matches('.').to_string();
            (!kept.iter().any(|k| rest.starts_with(k))).then_some((dst, rest))
        })
        .collect();
    for (dst, rest) in &pairs {
        let name = main.name(rest);
        let src = store.find(&name).ok_or_else(|| {
            crate::error::TrainError::Config(format!("the transformer has no {name} to copy into the ControlNet"))
        })?;
        let (from, to) = (&store.get(src).value, &store.get(*dst).value);
        if B::shape(from) != B::shape(to) {
            return Err(crate::error::TrainError::Config(format!(
                "{name} has shape {}, the ControlNet's {}",
                B::shape(from),
                B::shape(to)
            )));
        }
        let value = from.clone();
        store.get_mut(*dst).value = value;
    }
    Ok(pairs.len())
}

/// Writes the ControlNet under `at` as a diffusers folder (`config.json` from `config` and
/// `extras`, `diffusion_pytorch_model.safetensors` with diffusers' names and the positions
/// buffer), each file atomically, so that `SD3ControlNetModel.from_pretrained(dir)` loads it.
pub fn save_controlnet<B: Backend>(
    store: &ParamStore<B>,
    at: impl Into<Scope>,
    config: &Sd3Config,
    extras: Sd3ControlNetExtras,
    dir: &Path,
) -> Result<()> {
    use lisa_core::backend::{DType, Shape};
    let at = at.into();
    let (dim, m) = (config.inner_dim(), config.pos_embed_max_size);
    let table = sincos_positions(dim, m, config.sample_size / config.patch_size);
    let positions = B::from_slice(&table, &Shape::new([1, m * m, dim]), DType::F32, store.device())?;
    let prefix = if at.is_root() { String::new() } else { format!("{}.", at.path()) };
    let mut weights: Vec<(String, &B::Tensor)> = vec![(POSITIONS_BUFFER.to_string(), &positions)];
    weights.extend(
        store.iter().filter_map(|(_, p)| p.name.strip_prefix(prefix.as_str()).map(|n| (n.to_string(), &p.value))),
    );
    if weights.len() == 1 {
        return Err(crate::error::TrainError::Config(format!("no parameters under {at} to save")));
    }
    super::sd::write_diffusers_folder::<B>(&weights, &config.controlnet_json(extras), dir)
}
