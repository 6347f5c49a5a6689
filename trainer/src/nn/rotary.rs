//! Rotary position embeddings over several axes, as Flux uses them (diffusers' `FluxPosEmbed`
//! with `get_1d_rotary_pos_embed(use_real=True, repeat_interleave_real=True)` and
//! `apply_rotary_emb`): each token has one position per axis; axis `a` owns `dₐ` features of
//! every head, in pairs, pair `k` turned by the angle `pos · θ^(−2k/dₐ)`:
//!
//! `rope(x) = x ⊙ cos + rot(x) ⊙ sin`, `rot(x₀, x₁) = (−x₁, x₀)` per pair.
//!
//! The rotation is a product with a constant `[d, d]` matrix, so the forward and the backward
//! are the tape's multiply and matmul: no op of its own.

use lisa_core::backend::{Backend, DType, Shape, Transpose};

use crate::autodiff::{Tape, Var};
use crate::error::{Result, TrainError};

/// `(cos, sin)`, each `[ids.len(), Σ axes_dim]` row-major: the angles of every token's
/// positions (`ids[i]` has one position per axis), each repeated for the two features of its
/// pair. Angles in f64 (as diffusers' `freqs_dtype=torch.float64`), stored as f32.
pub fn rotary_tables(ids: &[Vec<f32>], axes_dim: &[usize], theta: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    if let Some(d) = axes_dim.iter().find(|d| **d == 0 || !d.is_multiple_of(2)) {
        return Err(TrainError::Config(format!("rotary axis widths must be even and positive, got {d}")));
    }
    let width: usize = axes_dim.iter().sum();
    let (mut cos, mut sin) = (Vec::with_capacity(ids.len() * width), Vec::with_capacity(ids.len() * width));
    for (i, pos) in ids.iter().enumerate() {
        if pos.len() != axes_dim.len() {
            return Err(TrainError::Mismatch(format!(
                "token {i} has {} position ids, the rotary embedding {} axes",
                pos.len(),
                axes_dim.len()
            )));
        }
        for (&p, &d) in pos.iter().zip(axes_dim) {
            for k in 0..d / 2 {
                let angle = p as f64 / theta.powf((2 * k) as f64 / d as f64);
                let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    Ok((cos, sin))
}

/// The tables of one sequence on the tape, ready to turn queries and keys.
#[derive(Debug, Clone)]
pub struct Rotary<B: Backend> {
    /// `[1, n, d]`.
    cos: Var<B>,
    /// `[1, n, d]`.
    sin: Var<B>,
    /// `[d, d]`: `x · rot` turns each pair `(x₀, x₁)` into `(−x₁, x₀)`.
    rot: Var<B>,
    tokens: usize,
    width: usize,
}

impl<B: Backend> Rotary<B> {
    /// From [`rotary_tables`]' `(cos, sin)` of `tokens` rows of `width`.
    pub fn new(tape: &Tape<B>, (cos, sin): (&[f32], &[f32]), tokens: usize, device: &B::Device) -> Result<Self> {
        let width = cos.len() / tokens.max(1);
        if tokens == 0 || cos.len() != tokens * width || sin.len() != cos.len() || !width.is_multiple_of(2) {
            return Err(TrainError::Mismatch(format!(
                "rotary tables of {} and {} values for {tokens} tokens",
                cos.len(),
                sin.len()
            )));
        }
        let table = |v: &[f32]| B::from_slice(v, &Shape::new([1, tokens, width]), DType::F32, device);
        let mut rot = vec![0.0f32; width * width];
        for k in 0..width / 2 {
            // out[2k] = −x[2k+1], out[2k+1] = x[2k]
            rot[(2 * k + 1) * width + 2 * k] = -1.0;
            rot[(2 * k) * width + 2 * k + 1] = 1.0;
        }
        Ok(Self {
            cos: tape.constant(table(cos)?),
            sin: tape.constant(table(sin)?),
            rot: tape.constant(B::from_slice(&rot, &Shape::new([width, width]), DType::F32, device)?),
            tokens,
            width,
        })
    }

    /// Tokens the tables cover.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `x [b·h, n, d]` (queries or keys, `n` and `d` the tables') turned: computed in f32 as
    /// diffusers does, returned in `x`'s dtype.
    pub fn apply(&self, t: &Tape<B>, x: &Var<B>) -> Result<Var<B>> {
        let dims = B::shape(&x.value).dims().to_vec();
        if dims.len() != 3 || dims[1] != self.tokens || dims[2] != self.width {
            return Err(TrainError::Mismatch(format!(
                "rotary tables of {} tokens × {} features, queries {}",
                self.tokens,
                self.width,
                B::shape(&x.value)
            )));
        }
        let dtype = B::dtype(&x.value);
        let x32 = t.cast(x, DType::F32)?;
        let turned = t.matmul(&x32, &self.rot, Transpose::default())?;
        let out = t.add(&t.mul(&x32, &self.cos)?, &t.mul(&turned, &self.sin)?)?;
        t.cast(&out, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lisa_core::backend::prelude::*;
    use lisa_cpu::{CpuBackend as C, CpuDevice};

    #[test]
    fn tables_repeat_each_angle_for_its_pair_axis_by_axis() {
        // Axes of 2 and 4 features: angles p₀, and p₁·[1, θ^(−1/2)].
        let (cos, sin) = rotary_tables(&[vec![0.0, 0.0], vec![3.0, 2.0]], &[2, 4], 100.0).unwrap();
        assert_eq!(cos.len(), 12);
        assert_eq!(&cos[..6], &[1.0; 6], "position zero: no turn");
        let want = [3.0f64, 3.0, 2.0, 2.0, 0.2, 0.2];
        for (k, a) in want.iter().enumerate() {
            assert!((cos[6 + k] as f64 - a.cos()).abs() < 1e-6 && (sin[6 + k] as f64 - a.sin()).abs() < 1e-6);
        }
        assert!(rotary_tables(&[vec![0.0]], &[3], 10.0).is_err(), "odd axis");
        assert!(rotary_tables(&[vec![0.0]], &[2, 2], 10.0).is_err(), "one id for two axes");
    }

    #[test]
    fn apply_turns_each_pair_by_its_angle() {
        let tape = Tape::<C>::new();
        let (cos, sin) = rotary_tables(&[vec![0.5]], &[2], 10000.0).unwrap();
        let rope = Rotary::new(&tape, (&cos, &sin), 1, &CpuDevice).unwrap();
        let x = tape.constant(C::from_slice(&[2.0, 1.0], &Shape::new([1, 1, 2]), DType::F32, &CpuDevice).unwrap());
        let y = C::to_vec(&rope.apply(&tape, &x).unwrap().value).unwrap();
        let (c, s) = (0.5f32.cos(), 0.5f32.sin());
        // (x₀, x₁) → (x₀ cos − x₁ sin, x₁ cos + x₀ sin)
        assert!((y[0] - (2.0 * c - s)).abs() < 1e-6 && (y[1] - (c + 2.0 * s)).abs() < 1e-6, "{y:?}");
    }
}
