//! AdamW over the trainable parameters, learning-rate schedules, gradient-norm clipping
//! and an exponential moving average of weights.

use lisa_core::backend::{AdamWParams, Backend};
use serde::{Deserialize, Serialize};

use crate::autodiff::{Gradients, VarId};
use crate::error::{Result, TrainError};
use crate::params::{ParamId, ParamStore};

/// Learning-rate schedule (the names of diffusers' `--lr_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout (the authors' choice).
    #[default]
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then half a cosine from `lr` to 0 at `total_steps`.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "constant_with_warmup" => Ok(Self::ConstantWithWarmup),
            "cosine" => Ok(Self::Cosine),
            _ => {
                Err(TrainError::Config(format!("unknown lr scheduler {s:?}: constant | constant_with_warmup | cosine")))
            }
        }
    }
}

/// Optimizer settings (defaults: AdamW 0.9/0.999, wd 1e-2, ε 1e-8, clip 1.0, constant lr).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f32,
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Schedule.
    pub schedule: LrSchedule,
    /// Warm-up steps.
    pub warmup_steps: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
        }
    }
}

impl OptimConfig {
    /// The learning rate for (0-based) `step` of `total_steps`.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f32 {
        let warm = |s: u64| {
            if self.warmup_steps > 0 && s < self.warmup_steps { (s + 1) as f32 / self.warmup_steps as f32 } else { 1.0 }
        };
        match self.schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::ConstantWithWarmup => self.lr * warm(step),
            LrSchedule::Cosine => {
                if step < self.warmup_steps {
                    return self.lr * warm(step);
                }
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                (self.lr as f64 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
        }
    }

    /// Checks domains (the backend re-checks each step's hyper-parameters).
    pub fn validate(&self, section: &str) -> Result<()> {
        AdamWParams {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: 1,
        }
        .validate()
        .map_err(|e| TrainError::in_section(section, e))?;
        if let Some(c) = self.max_grad_norm
            && !(c > 0.0 && c.is_finite())
        {
            return Err(TrainError::setting(format!("{section}.max_grad_norm"), format!("must be > 0, got {c}")));
        }
        Ok(())
    }
}

/// AdamW state: first and second moments per trainable parameter, and the step count.
pub struct AdamW<B: Backend> {
    /// `(param, m, v)` for every trainable parameter, in store order.
    pub moments: Vec<(ParamId, B::Tensor, B::Tensor)>,
    /// Completed optimizer steps.
    pub step: u64,
    /// Each parameter's learning rate as a multiple of the step's (1 unless
    /// [`AdamW::scale_lr`] set it; torch's parameter groups with their own `lr`). Part of the
    /// configuration, not of the state: checkpoints do not hold it.
    pub lr_scales: Vec<f32>,
}

impl<B: Backend> AdamW<B> {
    /// Zero moments for every trainable parameter of `store`.
    pub fn new(store: &ParamStore<B>) -> Result<Self> {
        let moments = store
            .iter()
            .filter(|(_, p)| p.trainable)
            .map(|(id, p)| Ok((id, B::zeros_like(&p.value)?, B::zeros_like(&p.value)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { lr_scales: vec![1.0; moments.len()], moments, step: 0 })
    }

    /// A tensor shaped like each gradient slot, in slot order (the first moments).
    pub fn slot_shapes(&self) -> Vec<&B::Tensor> {
        self.moments.iter().map(|(_, m, _)| m).collect()
    }

    /// Multiplies the learning rate of the parameters whose name `select` accepts by `factor`
    /// (AdamW's decoupled weight decay follows, as in a torch parameter group). Returns how
    /// many parameters it touched.
    pub fn scale_lr(&mut self, store: &ParamStore<B>, select: impl Fn(&str) -> bool, factor: f32) -> Result<usize> {
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(TrainError::Config(format!("a learning-rate scale must be > 0 and finite, got {factor}")));
        }
        let mut touched = 0;
        for ((id, _, _), scale) in self.moments.iter().zip(&mut self.lr_scales) {
            if select(&store.get(*id).name) {
                *scale *= factor;
                touched += 1;
            }
        }
        Ok(touched)
    }

    /// One step with learning rate `lr` (the fused backend op per tensor). `grads` are in the
    /// order of `self.moments`; a missing gradient counts as zero.
    pub fn update(
        &mut self,
        store: &mut ParamStore<B>,
        grads: &[Option<B::Tensor>],
        lr: f32,
        cfg: &OptimConfig,
    ) -> Result<()> {
        if grads.len() != self.moments.len() {
            return Err(TrainError::Internal("one gradient slot per trainable parameter expected"));
        }
        self.step += 1;
        let hp = AdamWParams {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: self.step,
        };
        for (((id, m, v), g), &scale) in self.moments.iter_mut().zip(grads).zip(&self.lr_scales) {
            let hp = AdamWParams { lr: lr * scale, ..hp };
            let param = store.get_mut(*id);
            let zero;
            let g = match g {
                Some(g) => g,
                None => {
                    zero = B::zeros_like(&param.value)?;
                    &zero
                }
            };
            B::adamw_update(&mut param.value, m, v, g, &hp)?;
        }
        Ok(())
    }
}

/// `‖g‖₂` over all tensors (one reduction, one read-back); inf or NaN when some gradient is.
pub fn grad_norm<B: Backend>(grads: &[Option<B::Tensor>]) -> Result<f32> {
    let present: Vec<&B::Tensor> = grads.iter().flatten().collect();
    Ok(B::sum_squares_all(&present)?.sqrt() as f32)
}

/// Gradients that are `S×` the true ones (loss scaling, `inverse = 1/S`; 1 without) with
/// finite norm `scaled_norm`: divided by `S` and clipped to `max_norm` in one pass (torch's
/// `scaler.unscale_` then `clip_grad_norm_`, whose factor is `min(1, max/(‖g‖ + 1e-6))`).
/// Returns the true gradients' norm.
pub fn unscale_and_clip<B: Backend>(
    grads: &mut [Option<B::Tensor>],
    scaled_norm: f32,
    inverse: f32,
    max_norm: Option<f32>,
) -> Result<f32> {
    let norm = scaled_norm * inverse;
    let mut factor = inverse;
    if let Some(max) = max_norm {
        let clip = max / (norm + 1e-6);
        if clip < 1.0 {
            factor *= clip;
        }
    }
    if factor != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = B::scale(g, factor)?;
        }
    }
    Ok(norm)
}

/// Exponential moving average of parameters: `θ̄ ← d_t·θ̄ + (1 − d_t)·θ`, with diffusers'
/// `EMAModel` warm-up `d_t = min(d, (1 + s)/(10 + s))`, `s = t − 1` (`d_1 = 0`), so that the
/// random initial weights do not linger in the average (with a constant 0.999 they would still
/// weigh 22 % after 1,500 steps).
pub struct Ema<B: Backend> {
    /// Decay d.
    pub decay: f32,
    /// `(param, shadow value)`.
    pub shadow: Vec<(ParamId, B::Tensor)>,
}

impl<B: Backend> Ema<B> {
    /// Starts at the current values of the parameters selected by `keep`.
    pub fn new(store: &ParamStore<B>, decay: f32, keep: impl Fn(&str) -> bool) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(TrainError::Config(format!("ema decay must lie in [0, 1), got {decay}")));
        }
        Ok(Self {
            decay,
            shadow: store.iter().filter(|(_, p)| keep(&p.name)).map(|(id, p)| (id, p.value.clone())).collect(),
        })
    }

    /// The decay used at (1-based) optimizer step `step`.
    pub fn decay_at(&self, step: u64) -> f32 {
        let s = step.saturating_sub(1) as f64;
        if s == 0.0 { 0.0 } else { self.decay.min(((1.0 + s) / (10.0 + s)) as f32) }
    }

    /// Exchanges the shadows with the store's values of the same parameters: once puts the
    /// averaged weights in the model, twice restores the trained ones (no copy).
    pub fn swap(&mut self, store: &mut ParamStore<B>) {
        for (id, s) in &mut self.shadow {
            std::mem::swap(&mut store.get_mut(*id).value, s);
        }
    }

    /// The update after optimizer step `step` (1-based) from the store's current values.
    pub fn update(&mut self, store: &ParamStore<B>, step: u64) -> Result<()> {
        let d = self.decay_at(step);
        for (id, s) in &mut self.shadow {
            *s = B::axpby(d, s, 1.0 - d, &store.get(*id).value)?;
        }
        Ok(())
    }
}

/// What every training loop runs after its backward, in one place: gradients gathered in
/// AdamW order, clipped, the AdamW update, the EMA.
pub struct Optimizer<B: Backend> {
    /// AdamW moments.
    pub adamw: AdamW<B>,
    /// EMA of the selected weights (None: off).
    pub ema: Option<Ema<B>>,
}

impl<B: Backend> Optimizer<B> {
    /// Zero moments for every trainable parameter of `store`; an EMA (decay `ema_decay`) of
    /// the parameters `ema_keep` selects.
    pub fn new(store: &ParamStore<B>, ema_decay: Option<f32>, ema_keep: impl Fn(&str) -> bool) -> Result<Self> {
        Ok(Self { adamw: AdamW::new(store)?, ema: ema_decay.map(|d| Ema::new(store, d, ema_keep)).transpose()? })
    }

    /// The gradient of each trainable parameter, in AdamW order, taken out of `grads` (the
    /// tape's gradients of the `leaves` a [`crate::params::Bound`] reported).
    pub fn gather(&self, leaves: Vec<(ParamId, VarId)>, grads: &mut Gradients<B>) -> Vec<Option<B::Tensor>> {
        let by_param: std::collections::HashMap<_, _> = leaves.into_iter().collect();
        self.adamw.moments.iter().map(|(pid, _, _)| by_param.get(pid).and_then(|vid| grads.remove(*vid))).collect()
    }

    /// Unscales (by `inverse`, 1 without loss scaling) and clips `grads` whose norm is
    /// `scaled_norm` (finite, [`grad_norm`]), updates `store` with `config` at the lr of
    /// schedule step `schedule_step` (0-based: the steps taken before) of `total`, and the EMA
    /// of loop step `step` (1-based; skipped steps count, as diffusers steps its EMA on every
    /// loop step). Returns `(gradient norm before clipping, lr)`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        store: &mut ParamStore<B>,
        grads: &mut [Option<B::Tensor>],
        (scaled_norm, inverse): (f32, f32),
        config: &OptimConfig,
        schedule_step: u64,
        step: u64,
        total: u64,
    ) -> Result<(f32, f32)> {
        let grad_norm = unscale_and_clip::<B>(grads, scaled_norm, inverse, config.max_grad_norm)?;
        let lr = config.lr_at(schedule_step, total);
        self.adamw.update(store, grads, lr, config)?;
        if let Some(ema) = &mut self.ema {
            ema.update(store, step)?;
        }
        Ok((grad_norm, lr))
    }
}
