//! The LISA objective in one place (docs/method.md §3): the target `τ`, its per-timestep
//! normalisation, the per-sample terms and the loss of a training micro-batch.
//!
//! - `τ = stopgrad(s_t·(y − M(x_t)))`: the part of the training target `y` the frozen prior
//!   `M` (the main network without residuals) misses, in the run's target space (`s_t = 1` in
//!   prediction units; the score conversion otherwise); see [`LisaConfig::sample_terms`].
//! - With `normalize_tau`, `τ` is divided by its root mean square at the sample's timestep
//!   ([`TauNorm`], measured once on the prior by [`measure_tau_norm`]).
//! - `L = MSE(M(x_t; r), y) + λ·d(D(h, t), τ)` ([`Objective::loss`]), `d` the run's distance
//!   (MSE or cosine), over the LISA samples (the first `lisa_subbatch` of the batch).
//!
//! Training depends on this module; the research instruments that read the same quantities
//! (the shares of `τ`, the linear probe) live in [`crate::analysis`], which training does not
//! depend on.

mod tau_norm;

use lisa_core::backend::{Backend, Shape};
use lisa_core::lisa::{LisaLoss, SampleTerms};
use lisa_core::{LisaConfig, NoiseLevel, Prediction};

pub use tau_norm::{TauNorm, TauNormConfig, measure_tau_norm};

use crate::data::Example;
use crate::error::Result;
use crate::model::{DualDenoiser, TrainOutputs};
use crate::scheduler::{NoiseProcess, add_noise};
use crate::stream::{NoisedBatch, RunStream, noise_batch_at};

/// The LISA term's per-sample factors for `levels`: [`LisaConfig::sample_terms`], with `τ`
/// divided by its scale at each level when `norm` is given.
pub fn lisa_terms(
    lisa: &LisaConfig,
    kind: Prediction,
    levels: &[NoiseLevel<f32>],
    norm: Option<&TauNorm>,
) -> Result<Vec<SampleTerms<f32>>> {
    levels
        .iter()
        .map(|l| {
            let mut terms = lisa.sample_terms(kind, *l)?;
            if let Some(n) = norm {
                terms.target_scale *= n.factor(l);
            }
            Ok(terms)
        })
        .collect()
}

/// A run's objective: its LISA settings, what the model predicts, and `τ`'s scale per
/// timestep when the run normalises it.
#[derive(Debug, Clone, Copy)]
pub struct Objective<'a> {
    /// λ, target space, distance, weighting.
    pub lisa: &'a LisaConfig,
    /// What the main network predicts (ε, v, x₀ or a flow velocity).
    pub prediction: Prediction,
    /// `τ`'s measured scale per timestep (`normalize_tau`), if any.
    pub norm: Option<&'a TauNorm>,
    /// The noise process, whose per-sample weights (a flow's weighting scheme and
    /// preconditioning) multiply the diffusion loss; None: unweighted.
    pub noise: Option<&'a NoiseProcess>,
}

/// One micro-batch's loss and the gradients that seed its backward.
pub struct Loss<B: Backend> {
    /// `MSE(M(x_t; r), y)`.
    pub main: f32,
    /// The LISA term (zero without a decoder output).
    pub lisa: LisaLoss<f32>,
    /// `∂L/∂pred`, scaled by the caller's gradient scale, `[n, c, h, w]`.
    pub grad_pred: B::Tensor,
    /// `∂L/∂D(h, t)` for the LISA samples, scaled likewise, `[k, c, h, w]`.
    pub grad_decoded: Option<B::Tensor>,
}

impl<B: Backend> Loss<B> {
    /// `main + λ·lisa`.
    pub fn total(&self) -> f32 {
        self.main + self.lisa.weighted
    }
}

impl Objective<'_> {
    /// The per-sample LISA factors of `levels` ([`lisa_terms`]).
    pub fn terms(&self, levels: &[NoiseLevel<f32>]) -> Result<Vec<SampleTerms<f32>>> {
        lisa_terms(self.lisa, self.prediction, levels, self.norm)
    }

    /// `L = MSE_w(pred, y) + λ·d(D(h, t), τ)` of a training forward's outputs against the
    /// batch's targets `y [n, c, h, w]` at `levels` (one per sample), `MSE_w` the mean of
    /// `w_i·(pred − y)²` with the noise process's per-sample weights `w_i` (1 without); both gradients are
    /// multiplied by `grad_scale` (`1/accumulation` for a mean over micro-batches). The LISA
    /// samples are the first `k` of the batch, `k` the decoder output's batch.
    pub fn loss<B: Backend>(
        &self,
        out: &TrainOutputs<B>,
        y: &B::Tensor,
        levels: &[NoiseLevel<f32>],
        grad_scale: f32,
    ) -> Result<Loss<B>> {
        let (main, g_pred) = match self.noise.and_then(|n| n.loss_weights(levels)) {
            None => B::mse_loss(&out.pred.value, y)?,
            Some(w) => {
                // mean(w·(p − y)²) = MSE(√w·p, √w·y); its gradient in p is √w times that in √w·p.
                let root: Vec<f32> = w.iter().map(|w| w.sqrt()).collect();
                let device = B::device(y);
                let root =
                    B::from_slice(&root, &Shape::new([w.len(), 1, 1, 1]), lisa_core::backend::DType::F32, &device)?;
                let (l, g) = B::mse_loss(&B::mul(&out.pred.value, &root)?, &B::mul(y, &root)?)?;
                (l, B::mul(&g, &root)?)
            }
        };
        let grad_pred = B::scale(&g_pred, grad_scale)?;
        let mut loss = Loss {
            main,
            lisa: LisaLoss { weighted: 0.0, distance: 0.0, zero_distance: 0.0 },
            grad_pred,
            grad_decoded: None,
        };
        let (Some(decoded), Some(prior)) = (&out.decoded, &out.prior) else { return Ok(loss) };
        // [k, c, h, w]: the decoder output, the prior and the targets of the LISA samples.
        let k = B::shape(&decoded.value).dims()[0];
        let dims = B::shape(y).dims().to_vec();
        let (n, sample) = (dims[0], dims[1..].iter().product::<usize>());
        let y_k = if k == n {
            y.clone()
        } else {
            let flat = B::reshape(y, &Shape::new([1, n, sample]))?;
            B::reshape(&B::slice_channels(&flat, 0, k)?, &Shape::new([&[k][..], &dims[1..]].concat()))?
        };
        let terms = self.terms(&levels[..k])?;
        let (lisa, g_dec) = B::lisa_loss(self.lisa, &terms, &decoded.value, &y_k, prior)?;
        loss.lisa = lisa;
        loss.grad_decoded = Some(B::scale(&g_dec, grad_scale)?);
        Ok(loss)
    }
}

/// `examples` noised at timesteps drawn uniformly inside the bucket `[from, to)` of the
/// schedule (fractions), draws and noise from a stream seeded with `seed`; with the condition
/// images when `with_hints`.
pub(crate) fn bucket_batch<B: Backend>(
    process: &NoiseProcess,
    model: &dyn DualDenoiser<B>,
    examples: &[Example],
    (from, to): (f32, f32),
    seed: u64,
    with_hints: bool,
) -> Result<NoisedBatch<B>> {
    let mut stream = RunStream::new(seed);
    // Draws inside [from, to), kept below `to` in f32.
    let draws: Vec<f32> =
        stream.uniforms(examples.len()).into_iter().map(|v| (from + v * (to - from)).min(to.next_down())).collect();
    noise_batch_at(&mut stream, process, model, with_hints, examples, 0.0, Some(&draws))
}

/// `s_b·(a − b)` per sample `[n, …]`: a difference from the prior in τ's units (the target
/// scale of [`LisaConfig::sample_terms`], divided by τ's scale at the level when `norm` is
/// given, as [`lisa_terms`] does). A level the terms reject gives NaN, which no caller lets
/// through: the τ shares compute the same levels' terms first (an error there), and a NaN
/// scale is refused by [`TauNorm::new`].
pub(crate) fn in_tau_units<B: Backend>(
    a: &B::Tensor,
    b: &B::Tensor,
    lisa: &LisaConfig,
    kind: Prediction,
    norm: Option<&TauNorm>,
    levels: &[NoiseLevel<f32>],
) -> Result<B::Tensor> {
    let scale = |l: &NoiseLevel<f32>| {
        let s = lisa.sample_terms(kind, *l).map_or(f32::NAN, |t| t.target_scale);
        norm.map_or(s, |n| s * n.factor(l))
    };
    add_noise::<B>(a, b, |l| (scale(l), -scale(l)), levels)
}
