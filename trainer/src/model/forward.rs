//! The forward passes every architecture shares, written once over [`DualDenoiser`]:
//! training (controlled prediction, hooked feature, LISA decoder and prior), inference
//! and the prior alone (pretraining).

use lisa_core::backend::Backend;

use super::{Conditioning, DualDenoiser, Residuals};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::Bound;

/// How a training forward runs the side network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SideMode {
    /// Recorded on the tape: its activations are held until the backward.
    #[default]
    Recorded,
    /// Gradient checkpointing (diffusers' `--gradient_checkpointing` for the ControlNet): run
    /// without recording, its activations freed at once, its outputs entering the rest of the
    /// graph as leaves ([`SideLeaves`]). After the backward, their gradients seed
    /// [`replay_side`], which runs the side network again, recorded, and backpropagates into
    /// its parameters: the same gradients for one more side forward, and the side network's
    /// activations never held together with the main decoder's.
    Checkpointed,
}

/// What a training forward computes beside the controlled prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardOptions {
    /// Compute the LISA term's inputs: the prior pass and the decoder output.
    pub lisa: bool,
    /// Restrict the LISA term to the first that many samples of the batch (a cost option,
    /// not in the paper; None = all).
    pub lisa_samples: Option<usize>,
    /// Recorded or checkpointed side network.
    pub side: SideMode,
}

impl ForwardOptions {
    /// With (`true`) or without the LISA term, over the whole batch, side network recorded.
    pub fn lisa(lisa: bool) -> Self {
        Self { lisa, ..Self::default() }
    }
}

/// What a training forward returns.
pub struct TrainOutputs<B: Backend> {
    /// The controlled prediction `M(x_t; + r)` (records the graph through the residuals).
    pub pred: Var<B>,
    /// The hooked pre-zero-conv side feature `h` (None: built without the decoder).
    pub hooked: Option<Var<B>>,
    /// `D(h, t)` for the LISA samples, when LISA is on.
    pub decoded: Option<Var<B>>,
    /// The prior prediction `M(x_t)` of the LISA samples, without residuals (no gradient).
    pub prior: Option<B::Tensor>,
    /// With [`SideMode::Checkpointed`], the side network's outputs as leaves, to seed
    /// [`replay_side`] after the backward.
    pub side_leaves: Option<SideLeaves<B>>,
}

/// The training forward (docs/method.md §3.3–3.6, §5). The main encoder runs under
/// no-grad (frozen weights, `x_t` needs no gradient); the controlled decoder records only
/// through the residuals; with `lisa`, the prior re-runs only the main decoder, without
/// residuals and without recording, reusing the encoder activations. `options.side` says
/// whether the side network is recorded or checkpointed; `options.lisa_samples` (≤ batch)
/// restricts the LISA term (prior pass and decoder) to the first that many samples.
pub fn forward_train<B: Backend>(
    model: &dyn DualDenoiser<B>,
    p: &Bound<'_, B>,
    x_t: &Var<B>,
    hint: &Var<B>,
    cond: &Conditioning,
    options: ForwardOptions,
) -> Result<TrainOutputs<B>> {
    let ForwardOptions { lisa, lisa_samples, side } = options;
    let tape = p.tape;
    let enc = tape.no_grad(|| model.encode_main(p, x_t, cond))?;
    let (residuals, hooked, side_leaves) = match side {
        SideMode::Recorded => {
            let out = model.side(p, x_t, hint, cond)?;
            let hooked = model.lisa_hook().map(|h| out.feature(h).cloned()).transpose()?;
            (out.residuals, hooked, None)
        }
        SideMode::Checkpointed => {
            let out = tape.no_grad(|| model.side(p, x_t, hint, cond))?;
            let leaf = |v: &Var<B>| tape.leaf(v.value.clone());
            let residuals = out.residuals.try_map(|v| Ok(leaf(v)))?;
            let hooked = model.lisa_hook().map(|h| out.feature(h).map(leaf)).transpose()?;
            let leaves = SideLeaves { residuals: residuals.clone(), hooked: hooked.clone() };
            (residuals, hooked, Some(leaves))
        }
    };
    let pred = model.decode_main(p, &enc, Some((&residuals, model.conditioning_scale())))?;
    let (decoded, prior) = lisa_term(model, p, &enc, hooked.as_ref(), cond, lisa, lisa_samples)?;
    Ok(TrainOutputs { pred, hooked, decoded, prior, side_leaves })
}

/// The side network's outputs as leaves of the training tape (gradient checkpointing): the
/// residuals and the hooked feature, whose gradients seed the replay of the side network.
pub struct SideLeaves<B: Backend> {
    /// One leaf per residual (`down_i`, then `mid`), as the main decoder read them.
    pub residuals: Residuals<B>,
    /// The hooked feature the LISA decoder read, when it did.
    pub hooked: Option<Var<B>>,
}

/// What [`replay_side`] returns: the replay tape's parameter leaves and their gradients.
pub type ReplayedSide<B> = (Vec<(crate::params::ParamId, crate::autodiff::VarId)>, crate::autodiff::Gradients<B>);

/// The second half of gradient checkpointing: the side network again on a fresh tape, with
/// `grads` (of the [`SideLeaves`], taken from the first backward) as the seeds of its
/// backward. Returns the tape's parameter leaves and their gradients.
pub fn replay_side<B: Backend>(
    model: &dyn DualDenoiser<B>,
    leaves: &SideLeaves<B>,
    grads: &mut crate::autodiff::Gradients<B>,
    x_t: &B::Tensor,
    hint: &B::Tensor,
    cond: &Conditioning,
) -> Result<ReplayedSide<B>> {
    let tape = crate::autodiff::Tape::<B>::new();
    let p = model.store().bind(&tape);
    let side = model.side(&p, &tape.constant(x_t.clone()), &tape.constant(hint.clone()), cond)?;
    let mut roots = Vec::new();
    for (out, leaf) in side.residuals.all().zip(leaves.residuals.all()) {
        if let Some(g) = leaf.id().and_then(|id| grads.remove(id)) {
            roots.push((out.clone(), g));
        }
    }
    if let (Some(h), Some(hook)) = (&leaves.hooked, model.lisa_hook())
        && let Some(g) = h.id().and_then(|id| grads.remove(id))
    {
        roots.push((side.feature(hook)?.clone(), g));
    }
    let refs: Vec<(&Var<B>, B::Tensor)> = roots.iter().map(|(v, g)| (v, g.clone())).collect();
    let param_leaves = p.leaves();
    let g = if refs.is_empty() { crate::autodiff::Gradients::default() } else { tape.backward(&refs)? };
    Ok((param_leaves, g))
}

/// The decoder output `D(h, t)` and the prior prediction of the LISA samples.
type LisaTerm<B> = (Option<Var<B>>, Option<<B as lisa_core::backend::BackendTypes>::Tensor>);

/// The LISA half of a training forward: with `lisa`, the prior (the main decoder again, without
/// residuals, no grad, reusing `enc`) and `D(h, t)` of the hooked feature, both for the
/// first `lisa_samples` samples; `(None, None)` without.
fn lisa_term<B: Backend>(
    model: &dyn DualDenoiser<B>,
    p: &Bound<'_, B>,
    enc: &super::MainEncoding<B>,
    hooked: Option<&Var<B>>,
    cond: &Conditioning,
    lisa: bool,
    lisa_samples: Option<usize>,
) -> Result<LisaTerm<B>> {
    let tape = p.tape;
    match (hooked, lisa) {
        (Some(h), true) => {
            let n = cond.t.len();
            let k = lisa_samples.unwrap_or(n);
            if k == 0 || k > n {
                return Err(TrainError::Config(format!("lisa sub-batch {k} must lie in 1..={n}")));
            }
            let prior = tape.no_grad(|| model.decode_main(p, &enc.slice_batch(tape, k)?, None))?;
            let h_k = tape.slice_batch(h, k)?;
            Ok((Some(model.decode_lisa(p, &h_k, &cond.t[..k])?), Some(prior.value)))
        }
        (None, true) => Err(TrainError::Config("LISA training needs a model built with the decoder".into())),
        (_, false) => Ok((None, None)),
    }
}

/// Inference: the controlled prediction only (no decoder, no prior pass), with the
/// residuals multiplied by `control_scale` (1 = as trained, 0 = the main model alone).
pub fn predict<B: Backend>(
    model: &dyn DualDenoiser<B>,
    p: &Bound<'_, B>,
    x_t: &Var<B>,
    hint: &Var<B>,
    cond: &Conditioning,
    control_scale: f32,
) -> Result<Var<B>> {
    let enc = model.encode_main(p, x_t, cond)?;
    let side = model.side(p, x_t, hint, cond)?;
    model.decode_main(p, &enc, Some((&side.residuals, control_scale)))
}

/// The main network alone, `M(x_t, t, c)` (pretraining the prior).
pub fn forward_prior<B: Backend>(
    model: &dyn DualDenoiser<B>,
    p: &Bound<'_, B>,
    x_t: &Var<B>,
    cond: &Conditioning,
) -> Result<Var<B>> {
    let enc = model.encode_main(p, x_t, cond)?;
    model.decode_main(p, &enc, None)
}
