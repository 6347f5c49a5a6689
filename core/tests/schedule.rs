//! Schedules: monotonicity, diffusers-compatible values recomputed independently, domains.

mod common;

use common::assert_close1;
use lisa_core::Error;
use lisa_core::schedule::{BetaSchedule, ContinuousVp, DiscreteVp, RectifiedFlow};
use lisa_core::tolerance::{F64_MATH, Tolerance};
use proptest::prelude::*;

const T: usize = 1000;

fn all_schedules() -> [(&'static str, BetaSchedule); 3] {
    [
        ("linear", BetaSchedule::DDPM_LINEAR),
        ("scaled_linear", BetaSchedule::SD_SCALED_LINEAR),
        ("squaredcos_cap_v2", BetaSchedule::COSINE),
    ]
}

#[test]
fn alphas_cumprod_strictly_decreasing_for_every_schedule() {
    for (name, kind) in all_schedules() {
        let s = DiscreteVp::<f64>::new(kind, T).unwrap();
        let acp = s.alphas_cumprod();
        assert_eq!(acp.len(), T);
        assert!(acp[0] < 1.0 && acp[T - 1] > 0.0, "{name}");
        for t in 1..T {
            assert!(acp[t] < acp[t - 1], "{name}: alphas_cumprod[{t}] not < [{}]", t - 1);
        }
    }
}

/// Product of `1 − β_i` for i ≤ t, with β given by an independent closure.
fn cumprod(t: usize, beta: impl Fn(usize) -> f64) -> f64 {
    (0..=t).map(|i| 1.0 - beta(i)).product()
}

#[test]
fn linear_endpoints_recomputed_from_the_formula() {
    let s = DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, T).unwrap();
    let beta = |i: usize| 1e-4 + (0.02 - 1e-4) * i as f64 / 999.0;
    assert_close1("acp[0]", s.alphas_cumprod()[0], 1.0 - 1e-4, F64_MATH);
    assert_close1("acp[999]", s.alphas_cumprod()[999], cumprod(999, beta), F64_MATH);
    // diffusers' DDPMScheduler (float32): alphas_cumprod[-1] = 4.0358e-05.
    assert_close1("acp[999] vs diffusers", s.alphas_cumprod()[999], 4.0358e-5, Tolerance { abs: 0.0, rel: 1e-3 });
}

#[test]
fn scaled_linear_endpoints_recomputed_from_the_formula() {
    let s = DiscreteVp::<f64>::new(BetaSchedule::SD_SCALED_LINEAR, T).unwrap();
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let beta = |i: usize| (a + (b - a) * i as f64 / 999.0).powi(2);
    assert_close1("acp[0]", s.alphas_cumprod()[0], 1.0 - 0.00085, F64_MATH);
    assert_close1("acp[999]", s.alphas_cumprod()[999], cumprod(999, beta), F64_MATH);
    // Stable Diffusion: sqrt(alphas_cumprod[-1]) ≈ 0.0683 (alphas_cumprod[-1] ≈ 0.00466).
    assert_close1("acp[999] vs SD", s.alphas_cumprod()[999], 0.00466, Tolerance { abs: 0.0, rel: 2e-2 });
}

#[test]
fn cosine_endpoints_from_the_telescoping_product() {
    // Unclipped, ∏(1 − β_i) = ᾱ((t+1)/T)/ᾱ(0); only the last β (1 − 0/…) hits the 0.999 clip.
    let f = |s: f64| ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
    let s = DiscreteVp::<f64>::new(BetaSchedule::COSINE, T).unwrap();
    assert_close1("acp[0]", s.alphas_cumprod()[0], f(1.0 / 1000.0) / f(0.0), F64_MATH);
    assert_close1("beta[999] clipped", s.betas()[999], 0.999, F64_MATH);
    let want = f(999.0 / 1000.0) / f(0.0) * (1.0 - 0.999);
    assert_close1("acp[999]", s.alphas_cumprod()[999], want, Tolerance { abs: 1e-15, rel: 1e-8 });
}

#[test]
fn discrete_levels_are_variance_preserving_with_matching_snr() {
    for (name, kind) in all_schedules() {
        let s = DiscreteVp::<f64>::new(kind, T).unwrap();
        for t in [0, 1, 250, 500, 998, 999] {
            let l = s.level(t).unwrap();
            assert_close1(name, l.alpha * l.alpha + l.sigma * l.sigma, 1.0, F64_MATH);
            let acp = s.alphas_cumprod()[t];
            assert_close1(name, s.snr(t).unwrap(), acp / (1.0 - acp), F64_MATH);
            assert_close1(name, l.snr(), acp / (1.0 - acp), Tolerance { abs: 1e-9, rel: 1e-8 });
            let (x0, eps) = (0.3, -1.2);
            assert_close1(name, s.add_noise(x0, eps, t).unwrap(), acp.sqrt() * x0 + (1.0 - acp).sqrt() * eps, F64_MATH);
            assert_close1(name, s.velocity(x0, eps, t).unwrap(), acp.sqrt() * eps - (1.0 - acp).sqrt() * x0, F64_MATH);
        }
    }
}

#[test]
fn f32_schedule_matches_f64_to_f32_precision() {
    let a = DiscreteVp::<f32>::new(BetaSchedule::SD_SCALED_LINEAR, T).unwrap();
    let b = DiscreteVp::<f64>::new(BetaSchedule::SD_SCALED_LINEAR, T).unwrap();
    for t in 0..T {
        let tol = Tolerance { abs: 1e-7, rel: 1e-4 };
        assert_close1("acp f32", a.alphas_cumprod()[t] as f64, b.alphas_cumprod()[t], tol);
    }
}

#[test]
fn bad_schedule_inputs_are_typed_errors() {
    assert!(matches!(DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, 0), Err(Error::Empty { .. })));
    let bad = BetaSchedule::Linear { start: -1.0, end: 0.02 };
    assert!(matches!(DiscreteVp::<f64>::new(bad, 10), Err(Error::InvalidArgument { .. })));
    let bad = BetaSchedule::Linear { start: f64::NAN, end: 0.02 };
    assert!(matches!(DiscreteVp::<f64>::new(bad, 10), Err(Error::InvalidArgument { .. })));
    let bad = BetaSchedule::SquaredCosCapV2 { max_beta: 1.0 };
    assert!(matches!(DiscreteVp::<f64>::new(bad, 10), Err(Error::InvalidArgument { .. })));
    let s = DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, 10).unwrap();
    assert!(matches!(s.level(10), Err(Error::InvalidArgument { .. })));
    assert!(RectifiedFlow::default().level(1.5f64).is_err());
    assert!(RectifiedFlow { shift: Some(-2.0) }.level(0.5f64).is_err());
    assert!(ContinuousVp::Cosine { s: 0.008 }.level(-0.1f64).is_err());
}

#[test]
fn rectified_flow_levels_and_sd3_shift() {
    let plain = RectifiedFlow::default();
    let l = plain.level(0.25f64).unwrap();
    assert_eq!((l.alpha, l.sigma), (0.75, 0.25));
    let shifted = RectifiedFlow { shift: Some(3.0) };
    let t = 0.25f64;
    let want = 3.0 * t / (1.0 + 2.0 * t);
    assert_close1("shift", shifted.level(t).unwrap().sigma, want, F64_MATH);
    assert_close1("shift(1)=1", shifted.shifted_time(1.0f64).unwrap(), 1.0, F64_MATH);
    assert_eq!(shifted.shifted_time(0.0f64).unwrap(), 0.0);
}

#[test]
fn continuous_vp_endpoints() {
    let lin = ContinuousVp::Linear { beta_min: 0.1, beta_max: 20.0 };
    let l0 = lin.level(0.0f64).unwrap();
    assert_eq!((l0.alpha, l0.sigma), (1.0, 0.0));
    let l1 = lin.level(1.0f64).unwrap();
    assert_close1("linear ᾱ(1)", l1.alpha * l1.alpha, (-(0.1 + 0.5 * 19.9f64)).exp(), F64_MATH);
    let cos = ContinuousVp::Cosine { s: 0.008 };
    assert_close1("cos ᾱ(0)", cos.alpha_bar(0.0f64).unwrap(), 1.0, F64_MATH);
    assert!(cos.alpha_bar(1.0f64).unwrap() < 1e-8);
}

proptest! {
    #[test]
    fn random_linear_schedules_decrease(start in 1e-5f64..0.01, span in 1e-4f64..0.5, steps in 2usize..2000) {
        let kind = BetaSchedule::Linear { start, end: (start + span).min(0.999) };
        let s = DiscreteVp::<f64>::new(kind, steps).unwrap();
        prop_assert!(s.alphas_cumprod().windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn continuous_levels_preserve_variance(t in 0.0f64..=1.0, cosine in any::<bool>()) {
        let kind = if cosine { ContinuousVp::Cosine { s: 0.008 } } else { ContinuousVp::Linear { beta_min: 0.1, beta_max: 20.0 } };
        let l = kind.level(t).unwrap();
        prop_assert!(F64_MATH.accepts(l.alpha * l.alpha + l.sigma * l.sigma, 1.0));
    }
}

/// diffusers computes `squaredcos_cap_v2` in Python floats (f64) and casts: the f32 betas
/// must be the f64 ones rounded, also at small t where an f32 computation loses digits.
#[test]
fn cosine_betas_are_computed_in_f64_and_cast() {
    let b64 = BetaSchedule::COSINE.betas::<f64>(1000).unwrap();
    let b32 = BetaSchedule::COSINE.betas::<f32>(1000).unwrap();
    for (i, (a, b)) in b64.iter().zip(&b32).enumerate() {
        assert_eq!(*a as f32, *b, "beta {i}");
    }
}
