//! Stable Diffusion 3 / 3.5: diffusers' `SD3Transformer2DModel` (MMDiT, the frozen main
//! network of a flow-matching model) and `SD3ControlNetModel` (the side network), built from
//! their `config.json` and loaded from diffusers folders with diffusers' tensor names.
//!
//! These are the networks and their loading; the trainable `sd3` architecture (the dual
//! model, the LISA hook `block_i` and the pipeline with its text encoders) builds on them.

mod block;
mod config;
mod controlnet;
mod embed;
mod transformer;

use std::path::Path;

use lisa_core::backend::Backend;

pub use block::{GeluFeedForward, JointAttention, JointBlock, Modulation, RmsNorm, SD3_NORM_EPS};
pub use config::{MAX_CHANNELS, MAX_LAYERS, MAX_WIDTH, QkNorm, Sd3Config, Sd3ControlNetExtras};
pub use controlnet::{Sd3ControlNet, Sd3ControlOutput};
pub use embed::{PatchEmbed, TimeTextEmbed, crop_positions, sincos_positions};
pub use transformer::{Sd3Inputs, Sd3Transformer};

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
