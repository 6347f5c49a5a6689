//! Parameterisations: every pair round-trips, all agree with (x₀, ε), scores match closed forms.

mod common;

use common::assert_close1;
use lisa_core::prediction::{convert_batch, score_batch};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use lisa_core::tolerance::Tolerance;
use lisa_core::{Error, NoiseLevel, Prediction};
use proptest::prelude::*;

/// Levels from every schedule kind, kept away from the endpoints where conversions
/// divide by ~0 (the tolerance below is scaled by the conditioning anyway).
fn any_level() -> impl Strategy<Value = NoiseLevel<f64>> {
    let discrete = (0usize..3, 0usize..1000).prop_map(|(k, t)| {
        let kind = [BetaSchedule::DDPM_LINEAR, BetaSchedule::SD_SCALED_LINEAR, BetaSchedule::COSINE][k];
        DiscreteVp::<f64>::new(kind, 1000).unwrap().level(t.min(998)).unwrap()
    });
    let flow =
        (0.01f64..0.99, prop::option::of(0.5f64..4.0)).prop_map(|(t, shift)| RectifiedFlow { shift }.level(t).unwrap());
    prop_oneof![discrete, flow]
}

fn any_kind() -> impl Strategy<Value = Prediction> {
    prop::sample::select(Prediction::ALL.to_vec())
}

/// Tolerance for a value that went through divisions by α and σ.
fn conditioned(level: NoiseLevel<f64>, magnitude: f64) -> Tolerance {
    let cond = 1.0 / (level.alpha.min(level.sigma).powi(2));
    Tolerance { abs: 1e-12 * cond * (1.0 + magnitude), rel: 1e-10 * cond }
}

proptest! {
    #[test]
    fn every_pair_round_trips(level in any_level(), from in any_kind(), to in any_kind(),
                              x_t in -3.0f64..3.0, p in -3.0f64..3.0) {
        let there = from.convert_to(to, level).unwrap();
        let back = to.convert_to(from, level).unwrap();
        let q = there.apply(x_t, p);
        let p2 = back.apply(x_t, q);
        prop_assert!(conditioned(level, x_t.abs() + p.abs()).accepts(p2, p), "{from:?}->{to:?}->{from:?}: {p} became {p2}");
    }

    #[test]
    fn all_parameterisations_agree_with_x0_and_eps(level in any_level(), from in any_kind(), to in any_kind(),
                                                   x0 in -2.0f64..2.0, eps in -3.0f64..3.0) {
        let x_t = level.add_noise(x0, eps);
        let p = from.target(level, x0, eps);
        let tol = conditioned(level, x0.abs() + eps.abs());
        prop_assert!(tol.accepts(from.to_sample(level).unwrap().apply(x_t, p), x0));
        prop_assert!(tol.accepts(from.to_epsilon(level).unwrap().apply(x_t, p), eps));
        prop_assert!(tol.accepts(from.convert_to(to, level).unwrap().apply(x_t, p), to.target(level, x0, eps)));
    }

    #[test]
    fn scores_match_closed_forms(level in any_level(), x0 in -2.0f64..2.0, eps in -3.0f64..3.0) {
        let x_t = level.add_noise(x0, eps);
        let (a, s) = (level.alpha, level.sigma);
        let want = -eps / s;
        let tol = conditioned(level, x0.abs() + eps.abs());
        // ε: −ε/σ;  x₀: −(x_t − α·x₀)/σ²;  v (any α, σ): −(σ·x_t + α·v)/((α² + σ²)·σ);  u: −(x_t + α·u)/((α + σ)·σ).
        let eps_score = Prediction::Epsilon.to_score(level).unwrap().apply(x_t, eps);
        prop_assert!(tol.accepts(eps_score, want));
        let x0_score = Prediction::Sample.to_score(level).unwrap().apply(x_t, x0);
        prop_assert!(tol.accepts(x0_score, -(x_t - a * x0) / (s * s)));
        let v = level.velocity(x0, eps);
        let v_score = Prediction::V.to_score(level).unwrap().apply(x_t, v);
        prop_assert!(tol.accepts(v_score, -(s * x_t + a * v) / ((a * a + s * s) * s)));
        let u = level.flow_velocity(x0, eps);
        let u_score = Prediction::FlowVelocity.to_score(level).unwrap().apply(x_t, u);
        prop_assert!(tol.accepts(u_score, -(x_t + a * u) / ((a + s) * s)));
        prop_assert!(tol.accepts(x0_score, want) && tol.accepts(v_score, want) && tol.accepts(u_score, want));
    }

    #[test]
    fn flow_score_is_the_documented_formula(t in 0.01f64..0.99, x_t in -3.0f64..3.0, u in -3.0f64..3.0) {
        let level = RectifiedFlow::default().level(t).unwrap();
        let got = Prediction::FlowVelocity.to_score(level).unwrap().apply(x_t, u);
        let tol = conditioned(level, x_t.abs() + u.abs());
        prop_assert!(tol.accepts(got, -(x_t + (1.0 - t) * u) / t));
    }
}

#[test]
fn batch_conversion_uses_one_level_per_sample() {
    let sched = DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, 1000).unwrap();
    let levels = [sched.level(10).unwrap(), sched.level(900).unwrap()];
    let x_t = [0.1, 0.2, 0.3, -0.4, 0.5, 0.6];
    let eps = [1.0, -1.0, 0.5, 0.25, -0.75, 2.0];
    let mut x0 = [0.0; 6];
    convert_batch(Prediction::Epsilon, Prediction::Sample, &levels, &x_t, &eps, &mut x0).unwrap();
    for i in 0..6 {
        let l = levels[i / 3];
        assert_close1("x0", x0[i], (x_t[i] - l.sigma * eps[i]) / l.alpha, Tolerance { abs: 1e-12, rel: 1e-12 });
    }
    let mut score = [0.0; 6];
    score_batch(Prediction::Epsilon, &levels, &x_t, &eps, &mut score).unwrap();
    assert_close1("score", score[4], -eps[4] / levels[1].sigma, Tolerance { abs: 1e-12, rel: 1e-12 });
    // 6 elements cannot be split over 4 samples; lengths must agree.
    let four = [levels[0]; 4];
    assert!(matches!(
        convert_batch(Prediction::V, Prediction::Sample, &four, &x_t, &eps, &mut x0),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        convert_batch(Prediction::V, Prediction::Sample, &levels, &x_t[..5], &eps, &mut x0),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn degenerate_levels_are_errors_not_infinities() {
    let clean = NoiseLevel::new(1.0f64, 0.0).unwrap();
    assert!(matches!(Prediction::Epsilon.to_score(clean), Err(Error::DegenerateNoiseLevel { .. })));
    assert!(matches!(Prediction::Sample.to_epsilon(clean), Err(Error::DegenerateNoiseLevel { .. })));
    let pure_noise = NoiseLevel::new(0.0f64, 1.0).unwrap();
    assert!(matches!(Prediction::Epsilon.to_sample(pure_noise), Err(Error::DegenerateNoiseLevel { .. })));
    // v and flow stay invertible at both ends.
    assert!(Prediction::V.to_sample(pure_noise).is_ok() && Prediction::FlowVelocity.to_epsilon(clean).is_ok());
    assert!(NoiseLevel::new(0.0f64, 0.0).is_err());
    assert!(NoiseLevel::new(f64::NAN, 1.0).is_err());
    assert!(NoiseLevel::new(-0.5f64, 1.0).is_err());
}
