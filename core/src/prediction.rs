//! What a denoiser predicts, and every conversion between the parameterisations.
//!
//! All four are linear in `(x₀, ε)` given `x_t = α·x₀ + σ·ε`:
//!
//! | kind | prediction `p = q₀·x₀ + q₁·ε` | `(q₀, q₁)` |
//! |---|---|---|
//! | [`Prediction::Epsilon`] | `ε` | `(0, 1)` |
//! | [`Prediction::Sample`] | `x₀` | `(1, 0)` |
//! | [`Prediction::V`] | `v = α·ε − σ·x₀` | `(−σ, α)` |
//! | [`Prediction::FlowVelocity`] | `u = ε − x₀` | `(−1, 1)` |
//!
//! Solving `[x_t; p] = [[α, σ], [q₀, q₁]]·[x₀; ε]` (determinant `D = α·q₁ − σ·q₀`) gives
//! `x₀ = (q₁·x_t − σ·p)/D` and `ε = (α·p − q₀·x_t)/D`, so every conversion is an
//! [`Affine`] map `out = a·x_t + b·p` whose coefficients depend only on the level.
//! The score is `∇log p(x_t) = −ε/σ`.

use crate::real::Real;
use crate::schedule::NoiseLevel;
use crate::slices::map2_per_sample;
use crate::{Error, Result};

/// A denoiser's output parameterisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Prediction {
    /// The noise `ε` (DDPM, Stable Diffusion 1.x/2.1-base).
    #[default]
    Epsilon,
    /// `v = α·ε − σ·x₀` (SD 2.x 768, Salimans & Ho).
    V,
    /// The clean sample `x₀`.
    Sample,
    /// Rectified-flow velocity `u = ε − x₀`.
    FlowVelocity,
}

/// `out = x_t·x_t + pred·p`: a conversion's coefficients at one noise level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine<F> {
    /// Coefficient of the noisy input `x_t`.
    pub x_t: F,
    /// Coefficient of the prediction `p`.
    pub pred: F,
}

impl<F: Real> Affine<F> {
    /// The identity map `out = p`.
    pub fn identity() -> Self {
        Self { x_t: F::zero(), pred: F::one() }
    }

    /// `a·x_t + b·p` for one element.
    #[inline]
    pub fn apply(&self, x_t: F, pred: F) -> F {
        self.x_t * x_t + self.pred * pred
    }

    /// `self ∘ (x_t, inner)`: `out = a·x_t + b·(a'·x_t + b'·p)`.
    fn after(self, inner: Affine<F>) -> Self {
        Affine { x_t: self.x_t + self.pred * inner.x_t, pred: self.pred * inner.pred }
    }
}

impl Prediction {
    /// All parameterisations, for iteration in tests and CLIs.
    pub const ALL: [Prediction; 4] = [Prediction::Epsilon, Prediction::V, Prediction::Sample, Prediction::FlowVelocity];

    /// `(q₀, q₁)` with `p = q₀·x₀ + q₁·ε` at `level`.
    pub fn coefficients<F: Real>(self, level: NoiseLevel<F>) -> (F, F) {
        match self {
            Prediction::Epsilon => (F::zero(), F::one()),
            Prediction::Sample => (F::one(), F::zero()),
            Prediction::V => (-level.sigma, level.alpha),
            Prediction::FlowVelocity => (-F::one(), F::one()),
        }
    }

    /// The training target `y = q₀·x₀ + q₁·ε` for one element
    /// (ε, `v = α·ε − σ·x₀`, x₀ or `u = ε − x₀`).
    #[inline]
    pub fn target<F: Real>(self, level: NoiseLevel<F>, x0: F, eps: F) -> F {
        let (q0, q1) = self.coefficients(level);
        q0 * x0 + q1 * eps
    }

    fn determinant<F: Real>(self, level: NoiseLevel<F>, op: &'static str) -> Result<F> {
        let (q0, q1) = self.coefficients(level);
        let d = level.alpha * q1 - level.sigma * q0;
        // Relative to the scale of the system, so that tiny-but-valid levels pass.
        let scale = (level.alpha.abs() + level.sigma.abs()) * (q0.abs() + q1.abs());
        if !(d.abs() > scale * F::epsilon()) {
            return Err(degenerate(op, level));
        }
        Ok(d)
    }

    /// `x₀ = (q₁·x_t − σ·p)/D` as an [`Affine`] in `(x_t, p)`.
    pub fn to_sample<F: Real>(self, level: NoiseLevel<F>) -> Result<Affine<F>> {
        if self == Prediction::Sample {
            return Ok(Affine::identity());
        }
        let d = self.determinant(level, "Prediction::to_sample")?;
        let (_, q1) = self.coefficients(level);
        Ok(Affine { x_t: q1 / d, pred: -level.sigma / d })
    }

    /// `ε = (α·p − q₀·x_t)/D` as an [`Affine`] in `(x_t, p)`.
    pub fn to_epsilon<F: Real>(self, level: NoiseLevel<F>) -> Result<Affine<F>> {
        if self == Prediction::Epsilon {
            return Ok(Affine::identity());
        }
        let d = self.determinant(level, "Prediction::to_epsilon")?;
        let (q0, _) = self.coefficients(level);
        Ok(Affine { x_t: -q0 / d, pred: level.alpha / d })
    }

    /// The map from a `self` prediction to a `to` prediction at `level`:
    /// `p_to = r₀·x₀(p) + r₁·ε(p)` with `(r₀, r₁)` the coefficients of `to`.
    pub fn convert_to<F: Real>(self, to: Prediction, level: NoiseLevel<F>) -> Result<Affine<F>> {
        if self == to {
            return Ok(Affine::identity());
        }
        let x0 = self.to_sample(level)?;
        let eps = self.to_epsilon(level)?;
        let (r0, r1) = to.coefficients(level);
        Ok(Affine { x_t: r0 * x0.x_t + r1 * eps.x_t, pred: r0 * x0.pred + r1 * eps.pred })
    }

    /// The score `∇_{x_t} log p_t(x_t) = −ε(p)/σ` as an [`Affine`] in `(x_t, p)`.
    /// For rectified flow this is `−(x_t + (1 − t)·u)/t`.
    pub fn to_score<F: Real>(self, level: NoiseLevel<F>) -> Result<Affine<F>> {
        if !(level.sigma > F::zero()) {
            return Err(degenerate("Prediction::to_score", level));
        }
        let scale = Affine { x_t: F::zero(), pred: -F::one() / level.sigma };
        Ok(scale.after(self.to_epsilon(level)?))
    }
}

fn degenerate<F: Real>(op: &'static str, level: NoiseLevel<F>) -> Error {
    Error::DegenerateNoiseLevel { op, alpha: level.alpha.to_f64_lossless(), sigma: level.sigma.to_f64_lossless() }
}

/// Converts a batch of predictions, one level per sample:
/// `out[b, i] = a_b·x_t[b, i] + b_b·pred[b, i]` with `(a_b, b_b) = from.convert_to(to, levels[b])`.
pub fn convert_batch<F: Real>(
    from: Prediction,
    to: Prediction,
    levels: &[NoiseLevel<F>],
    x_t: &[F],
    pred: &[F],
    out: &mut [F],
) -> Result<()> {
    apply_batch("convert_batch", levels, x_t, pred, out, |l| from.convert_to(to, l))
}

/// The score of a batch of predictions, one level per sample: `out = −ε(pred)/σ_b`.
pub fn score_batch<F: Real>(
    kind: Prediction,
    levels: &[NoiseLevel<F>],
    x_t: &[F],
    pred: &[F],
    out: &mut [F],
) -> Result<()> {
    apply_batch("score_batch", levels, x_t, pred, out, |l| kind.to_score(l))
}

fn apply_batch<F: Real>(
    op: &'static str,
    levels: &[NoiseLevel<F>],
    x_t: &[F],
    pred: &[F],
    out: &mut [F],
    coeffs: impl Fn(NoiseLevel<F>) -> Result<Affine<F>>,
) -> Result<()> {
    map2_per_sample(op, levels, x_t, pred, out, |&level| {
        let c = coeffs(level)?;
        Ok(move |x, p| c.apply(x, p))
    })
}
