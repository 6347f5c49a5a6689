//! Research instruments: what a model's side network has learnt, measured without changing
//! it. The shares of the LISA target `τ` that the decoder and the control explain per
//! timestep bucket ([`tau_share`]), and a linear probe from side features to the condition
//! ([`probe`]). Validation of the toy task reports both; training never depends on them.

pub mod probe;
pub mod tau_share;
