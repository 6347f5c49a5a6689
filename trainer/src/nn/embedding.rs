use lisa_core::backend::{Backend, DType, Shape, Transpose};

use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, Init, ParamId, ParamStore, Scope};

/// Sinusoidal timestep embedding (DDPM / diffusers `get_timestep_embedding`, cos first):
/// `e[b, i] = cos(t_b·ωᵢ)`, `e[b, half + i] = sin(t_b·ωᵢ)`, `ωᵢ = 10000^(−i/half)`.
/// Returns `[t.len(), dim]` row-major.
pub fn sinusoidal_embedding(t: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0.0f32; t.len() * dim];
    for (b, &tb) in t.iter().enumerate() {
        for i in 0..half {
            let freq = (-(10000f64.ln()) * i as f64 / half as f64).exp();
            let arg = tb as f64 * freq;
            out[b * dim + i] = arg.cos() as f32;
            out[b * dim + half + i] = arg.sin() as f32;
        }
    }
    out
}

/// A learned embedding of class ids (prompt words in the toy), with id `classes − 1`
/// reserved as the null (unconditional) id by convention of the caller.
#[derive(Debug, Clone)]
pub struct ClassEmbedding {
    /// Table `[classes, dim]`.
    pub table: ParamId,
    /// Number of ids.
    pub classes: usize,
}

impl ClassEmbedding {
    /// `N(0, 1)` rows: parameter `weight` under `at`.
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        at: impl Into<Scope>,
        classes: usize,
        dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            table: store.add(at.into().name("weight"), &[classes, dim], Init::LecunNormal { fan_in: 1 })?,
            classes,
        })
    }

    /// Rows of the table for `ids`: `one_hot(ids) [n, classes] · table → [n, dim]`.
    pub fn forward<B: Backend>(&self, p: &Bound<'_, B>, ids: &[usize]) -> Result<Var<B>> {
        let mut one_hot = vec![0.0f32; ids.len() * self.classes];
        for (row, &id) in ids.iter().enumerate() {
            if id >= self.classes {
                return Err(TrainError::Mismatch(format!("class id {id} out of range 0..{}", self.classes)));
            }
            one_hot[row * self.classes + id] = 1.0;
        }
        let device = B::device(&p.p(self.table).value);
        let oh = B::from_slice(&one_hot, &Shape::new([ids.len(), self.classes]), DType::F32, &device)?;
        p.tape.matmul(&p.tape.constant(oh), p.p(self.table), Transpose::default())
    }
}
