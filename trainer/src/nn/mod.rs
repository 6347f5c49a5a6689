//! Layers: each holds [`ParamId`](crate::params::ParamId)s and a forward over bound
//! parameters; gradients come from the autodiff ops they are built of.

mod attention;
mod blocks;
mod embedding;
mod layers;
mod rotary;
mod transformer;

pub use attention::SelfAttention;
pub use blocks::{Downsample, ResBlock, ResBlockConfig, Upsample};
pub use embedding::{ClassEmbedding, sinusoidal_embedding};
pub use layers::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear, RmsNorm};
pub use rotary::{Rotary, rotary_tables};
pub use transformer::{
    AttentionConfig, AttentionNames, CLIP_ATTENTION, DIFFUSERS_ATTENTION, GegluFeedForward, MultiHeadAttention,
    TRANSFORMER_NORM_EPS, TransformerBlock, VAE_ATTENTION,
};
