//! Dynamic loss scaling for fp16 training, with the semantics of torch's `GradScaler` at its
//! defaults (the scaler accelerate uses under `--mixed_precision fp16`).
//!
//! fp16 has 5 exponent bits: gradients below 2⁻²⁴ flush to zero. So the loss is multiplied by
//! a scale `S` before the backward (every gradient is `S×` the true one), and the gradients
//! are divided by `S` before they reach the optimizer. Per optimizer step:
//! - some gradient inf or NaN → the step is **skipped** (no weight, moment or EMA changes),
//!   `S ← S/2`, and the count of good steps restarts;
//! - otherwise the step is taken and, after `growth_interval` consecutive good steps,
//!   `S ← 2S` (only while `2S` is finite).
//!
//! The scale is kept as its base-2 exponent: with torch's factors (2 and ½) and initial scale
//! (2¹⁶) it is always a power of two, so the state is two integers, exact in a checkpoint, and
//! dividing by it is exact in any float format.

use alloc::format;

use crate::{Error, Result};

/// The settings of a [`LossScaler`] (torch's `GradScaler(init_scale=2**16, growth_factor=2.0,
/// backoff_factor=0.5, growth_interval=2000)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LossScaleConfig {
    /// `log₂` of the first scale (16: `S = 65536`).
    pub init_log2: i32,
    /// Consecutive good steps after which the scale doubles (2000).
    pub growth_interval: u32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self { init_log2: 16, growth_interval: 2000 }
    }
}

/// The smallest and largest scale exponents: every scale is a normal, finite f32.
pub const LOG2_RANGE: core::ops::RangeInclusive<i32> = -126..=127;

impl LossScaleConfig {
    /// Checks domains: `init_log2` in [`LOG2_RANGE`], `growth_interval ≥ 1`. An error's `op`
    /// names the field.
    pub fn validate(&self) -> Result<()> {
        if !LOG2_RANGE.contains(&self.init_log2) {
            return Err(Error::invalid(
                "init_log2",
                format!("must lie in {}..={}, got {}", LOG2_RANGE.start(), LOG2_RANGE.end(), self.init_log2),
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::invalid("growth_interval", "must be >= 1"));
        }
        Ok(())
    }
}

/// Where a scaler stands: what a checkpoint keeps to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossScaleState {
    /// `log₂ S`.
    pub log2: i32,
    /// Good steps since the scale last changed (torch's `_growth_tracker`).
    pub good_steps: u32,
}

/// What [`LossScaler::update`] did to a step and the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleEvent {
    /// The step was taken; the scale is unchanged.
    Kept,
    /// The step was taken and the scale doubled (`growth_interval` good steps in a row).
    Grew,
    /// A gradient was inf or NaN: the step was skipped and the scale halved (or stayed at
    /// the smallest scale, `2⁻¹²⁶`).
    Skipped,
}

impl ScaleEvent {
    /// Whether the optimizer step is taken.
    pub fn step_taken(self) -> bool {
        self != ScaleEvent::Skipped
    }
}

/// A dynamic loss scaler (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossScaler {
    config: LossScaleConfig,
    state: LossScaleState,
}

impl LossScaler {
    /// A fresh scaler at `2^init_log2`.
    pub fn new(config: LossScaleConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, state: LossScaleState { log2: config.init_log2, good_steps: 0 } })
    }

    /// A scaler resumed from `state` (checked: a corrupt state is an error, not a wrong scale).
    pub fn resume(config: LossScaleConfig, state: LossScaleState) -> Result<Self> {
        config.validate()?;
        if !LOG2_RANGE.contains(&state.log2) || state.good_steps >= config.growth_interval {
            return Err(Error::invalid(
                "loss scale state",
                format!(
                    "log2 {} must lie in {}..={} and good_steps {} below growth_interval {}",
                    state.log2,
                    LOG2_RANGE.start(),
                    LOG2_RANGE.end(),
                    state.good_steps,
                    config.growth_interval
                ),
            ));
        }
        Ok(Self { config, state })
    }

    /// The state to checkpoint.
    pub fn state(&self) -> LossScaleState {
        self.state
    }

    /// The settings.
    pub fn config(&self) -> LossScaleConfig {
        self.config
    }

    /// The scale `S = 2^log2` the next backward multiplies the loss by.
    pub fn scale(&self) -> f32 {
        pow2(self.state.log2)
    }

    /// `1/S`, exact: what the gradients are multiplied by before the optimizer.
    pub fn inverse_scale(&self) -> f32 {
        // Exact: 1 over a power of two (2⁻¹²⁷ is subnormal, still exact).
        1.0 / self.scale()
    }

    /// After a backward whose gradients were (`finite`) or were not all finite: skip or take
    /// the step, and move the scale.
    pub fn update(&mut self, finite: bool) -> ScaleEvent {
        if !finite {
            self.state = LossScaleState { log2: (self.state.log2 - 1).max(*LOG2_RANGE.start()), good_steps: 0 };
            return ScaleEvent::Skipped;
        }
        let good = self.state.good_steps + 1;
        if good < self.config.growth_interval {
            self.state.good_steps = good;
            return ScaleEvent::Kept;
        }
        // torch resets the tracker and doubles only while the doubled scale is finite.
        self.state.good_steps = 0;
        if self.state.log2 < *LOG2_RANGE.end() {
            self.state.log2 += 1;
            ScaleEvent::Grew
        } else {
            ScaleEvent::Kept
        }
    }
}

/// `2^e` for `e` in [`LOG2_RANGE`], exactly, from the f32 bit pattern.
fn pow2(e: i32) -> f32 {
    let e = e.clamp(*LOG2_RANGE.start(), *LOG2_RANGE.end());
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn torch_defaults() {
        let s = LossScaler::new(LossScaleConfig::default()).unwrap();
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.inverse_scale(), 1.0 / 65536.0);
        assert_eq!(s.config().growth_interval, 2000);
    }

    #[test]
    fn an_overflow_skips_the_step_and_halves_the_scale() {
        let mut s = LossScaler::new(LossScaleConfig::default()).unwrap();
        for _ in 0..5 {
            assert_eq!(s.update(true), ScaleEvent::Kept);
        }
        assert_eq!(s.update(false), ScaleEvent::Skipped);
        assert!(!ScaleEvent::Skipped.step_taken());
        assert_eq!(s.scale(), 32768.0);
        assert_eq!(s.state().good_steps, 0, "a skip restarts the count of good steps");
    }

    #[test]
    fn the_scale_doubles_after_growth_interval_good_steps() {
        let mut s = LossScaler::new(LossScaleConfig::default()).unwrap();
        for _ in 0..1999 {
            assert_eq!(s.update(true), ScaleEvent::Kept);
        }
        assert_eq!(s.update(true), ScaleEvent::Grew);
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.state().good_steps, 0);
    }

    #[test]
    fn the_scale_stays_finite_and_normal() {
        let mut top = LossScaler::new(LossScaleConfig { init_log2: 127, growth_interval: 1 }).unwrap();
        assert_eq!(top.update(true), ScaleEvent::Kept, "2^128 is not finite: no growth");
        assert!(top.scale().is_finite());
        let mut bottom = LossScaler::new(LossScaleConfig { init_log2: -126, growth_interval: 1 }).unwrap();
        assert_eq!(bottom.update(false), ScaleEvent::Skipped);
        assert_eq!(bottom.scale(), f32::MIN_POSITIVE);
    }

    #[test]
    fn bad_settings_and_states_are_refused() {
        assert!(LossScaleConfig { init_log2: 128, growth_interval: 1 }.validate().is_err());
        assert!(LossScaleConfig { init_log2: 0, growth_interval: 0 }.validate().is_err());
        let c = LossScaleConfig::default();
        assert!(LossScaler::resume(c, LossScaleState { log2: 16, good_steps: 2000 }).is_err());
        assert!(LossScaler::resume(c, LossScaleState { log2: 200, good_steps: 0 }).is_err());
        assert!(LossScaler::resume(c, LossScaleState { log2: 3, good_steps: 1999 }).is_ok());
    }

    proptest! {
        /// The scale is `2^(init + growths − skips)` clamped to the range, a power of two whose
        /// inverse is exact, and a resumed scaler continues exactly as the original.
        #[test]
        fn scale_follows_the_events(
            events in proptest::collection::vec(any::<bool>(), 0..200),
            interval in 1u32..8,
            init in -120i32..120,
            cut in 0usize..200,
        ) {
            let config = LossScaleConfig { init_log2: init, growth_interval: interval };
            let mut s = LossScaler::new(config).unwrap();
            let mut resumed = None;
            let mut run = 0u32;
            let mut log2 = init;
            for (i, &finite) in events.iter().enumerate() {
                if i == cut.min(events.len()) {
                    resumed = Some(LossScaler::resume(config, s.state()).unwrap());
                }
                let e = s.update(finite);
                if let Some(r) = &mut resumed {
                    prop_assert_eq!(r.update(finite), e);
                }
                if finite {
                    run += 1;
                    if run == interval { run = 0; log2 = (log2 + 1).min(127); }
                    prop_assert!(e.step_taken());
                } else {
                    run = 0;
                    log2 = (log2 - 1).max(-126);
                    prop_assert_eq!(e, ScaleEvent::Skipped);
                }
                prop_assert_eq!(s.state().log2, log2);
                prop_assert_eq!(s.scale() * s.inverse_scale(), 1.0);
                prop_assert_eq!(s.scale(), 2f32.powi(log2));
            }
        }
    }
}
