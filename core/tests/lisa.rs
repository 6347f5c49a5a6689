//! The LISA target, distances, weightings, and the loss gradient against finite differences.

mod common;

use common::{assert_close, assert_close1, central_difference};
use lisa_core::lisa::{LisaLoss, SampleTerms, cosine_distance, lisa_loss, lisa_loss_fused, lisa_target, mse_loss};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use lisa_core::tolerance::{F64_FINITE_DIFFERENCE, F64_MATH, FD_STEP_F64, Tolerance};
use lisa_core::{Distance, Error, LisaConfig, Prediction, TargetSpace, Weighting};
use proptest::prelude::*;

/// A batch: (decoded, y, prior, per-sample terms), `batch × per` elements.
fn batch() -> impl Strategy<Value = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<SampleTerms<f64>>)> {
    (1usize..4, 1usize..7).prop_flat_map(|(b, per)| {
        let n = b * per;
        (
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(-2.0f64..2.0, n),
            prop::collection::vec(
                (0.1f64..3.0, 0.1f64..2.0).prop_map(|(s, w)| SampleTerms { target_scale: s, weight: w }),
                b,
            ),
        )
    })
}

fn config(distance: Distance, lambda: f64) -> LisaConfig {
    LisaConfig { lambda, distance, ..LisaConfig::default() }
}

fn loss_value(cfg: &LisaConfig, terms: &[SampleTerms<f64>], d: &[f64], y: &[f64], prior: &[f64]) -> f64 {
    let mut g = vec![0.0; d.len()];
    lisa_loss_fused(cfg, terms, d, y, prior, &mut g).unwrap().weighted
}

proptest! {
    #[test]
    fn target_is_zero_when_prior_is_exact(y in prop::collection::vec(-5.0f64..5.0, 12), scale in 0.1f64..4.0) {
        let mut tau = vec![1.0; 12];
        let terms = [SampleTerms { target_scale: scale, weight: 1.0 }; 3];
        lisa_target(&terms, &y, &y, &mut tau).unwrap();
        prop_assert!(tau.iter().all(|&t| t == 0.0));
        // …and the MSE term then only pulls the decoder towards zero.
        let d = vec![0.0; 12];
        let mut g = vec![0.0; 12];
        let l = lisa_loss_fused(&LisaConfig::default(), &terms, &d, &y, &y, &mut g).unwrap();
        prop_assert_eq!(l, LisaLoss { weighted: 0.0, distance: 0.0, zero_distance: 0.0 });
    }

    #[test]
    fn mse_gradient_matches_central_difference((d, y, prior, terms) in batch(), lambda in 0.0f64..2.0) {
        let cfg = config(Distance::Mse, lambda);
        let mut grad = vec![0.0; d.len()];
        lisa_loss_fused(&cfg, &terms, &d, &y, &prior, &mut grad).unwrap();
        let fd = central_difference(&d, FD_STEP_F64, |d| loss_value(&cfg, &terms, d, &y, &prior));
        assert_close("∂L/∂d (mse)", &grad, &fd, F64_FINITE_DIFFERENCE);
    }

    #[test]
    fn cosine_gradient_matches_central_difference((d, y, prior, terms) in batch(), lambda in 0.0f64..2.0) {
        let cfg = config(Distance::Cosine, lambda);
        // Keep away from ‖d‖ ≈ 0 and ‖τ‖ ≈ 0, where the distance is not differentiable.
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let per = d.len() / terms.len();
        for b in 0..terms.len() {
            let r = b * per..(b + 1) * per;
            let tau: Vec<f64> = r.clone().map(|i| y[i] - prior[i]).collect();
            prop_assume!(norm(&d[r]) > 1e-2 && norm(&tau) > 1e-2);
        }
        let mut grad = vec![0.0; d.len()];
        lisa_loss_fused(&cfg, &terms, &d, &y, &prior, &mut grad).unwrap();
        let fd = central_difference(&d, FD_STEP_F64, |d| loss_value(&cfg, &terms, d, &y, &prior));
        let scale = 1.0 / norm(&d).powi(2).min(1.0);
        assert_close("∂L/∂d (cosine)", &grad, &fd, Tolerance { abs: F64_FINITE_DIFFERENCE.abs * scale, rel: F64_FINITE_DIFFERENCE.rel });
    }

    #[test]
    fn fused_equals_target_then_loss((d, y, prior, terms) in batch(), cosine in any::<bool>()) {
        let cfg = config(if cosine { Distance::Cosine } else { Distance::Mse }, 0.2);
        let mut tau = vec![0.0; d.len()];
        lisa_target(&terms, &y, &prior, &mut tau).unwrap();
        let (mut g1, mut g2) = (vec![0.0; d.len()], vec![0.0; d.len()]);
        let a = lisa_loss(&cfg, &terms, &d, &tau, &mut g1).unwrap();
        let b = lisa_loss_fused(&cfg, &terms, &d, &y, &prior, &mut g2).unwrap();
        assert_close1("loss", a.weighted, b.weighted, F64_MATH);
        assert_close("grad", &g1, &g2, F64_MATH);
    }

    #[test]
    fn unit_mse_is_lambda_times_torch_mse(d in prop::collection::vec(-2.0f64..2.0, 12), tau in prop::collection::vec(-2.0f64..2.0, 12)) {
        let terms = [SampleTerms::unit(); 4];
        let mut g = vec![0.0; 12];
        let l = lisa_loss(&LisaConfig::default(), &terms, &d, &tau, &mut g).unwrap();
        let mse = d.iter().zip(&tau).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / 12.0;
        assert_close1("distance", l.distance, mse, F64_MATH);
        assert_close1("weighted", l.weighted, 0.2 * mse, F64_MATH);
        let mut g_main = vec![0.0; 12];
        assert_close1("mse_loss", mse_loss(&d, &tau, &mut g_main).unwrap(), mse, F64_MATH);
        let scaled: Vec<f64> = g_main.iter().map(|x| 0.2 * x).collect();
        assert_close("λ·∂mse", &g, &scaled, F64_MATH);
    }

    #[test]
    fn cosine_is_bounded_and_scale_invariant(d in prop::collection::vec(-2.0f64..2.0, 8), tau in prop::collection::vec(-2.0f64..2.0, 8),
                                             c in 0.01f64..100.0, k in 0.01f64..100.0) {
        let eps = 1e-8;
        let base = cosine_distance(&d, &tau, eps).unwrap();
        prop_assert!((0.0..=2.0 + 1e-12).contains(&base));
        let sd: Vec<f64> = d.iter().map(|x| c * x).collect();
        let st: Vec<f64> = tau.iter().map(|x| k * x).collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        prop_assume!(norm(&d).min(norm(&tau)) * c.min(k) > 1e-6);
        let tol = Tolerance { abs: 1e-9, rel: 1e-9 };
        prop_assert!(tol.accepts(cosine_distance(&sd, &st, eps).unwrap(), base));
    }
}

#[test]
fn cosine_extremes() {
    let tau = [1.0f64, -2.0, 3.0];
    let same = [2.0f64, -4.0, 6.0];
    let opposite = [-1.0f64, 2.0, -3.0];
    assert!(cosine_distance(&same, &tau, 1e-8).unwrap().abs() < 1e-12);
    assert!((cosine_distance(&opposite, &tau, 1e-8).unwrap() - 2.0).abs() < 1e-12);
    // A zero decoder output (the zero-initialised decoder at step 0) gives distance 1 and a finite gradient.
    let cfg = config(Distance::Cosine, 0.2);
    let mut g = [0.0f64; 3];
    let l = lisa_loss(&cfg, &[SampleTerms::unit()], &[0.0; 3], &tau, &mut g).unwrap();
    assert!((l.distance - 1.0).abs() < 1e-12 && g.iter().all(|x| x.is_finite()));
}

#[test]
fn weightings_follow_their_formulas() {
    let sched = DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, 1000).unwrap();
    for t in [5usize, 100, 500, 999] {
        let level = sched.level(t).unwrap();
        let snr = level.snr();
        let gamma = 5.0;
        let min_snr = LisaConfig { weighting: Weighting::MinSnr { gamma }, ..LisaConfig::default() };
        let w = |kind| min_snr.sample_terms(kind, level).unwrap().weight;
        let tol = Tolerance { abs: 1e-12, rel: 1e-9 };
        assert_close1("min-snr ε", w(Prediction::Epsilon), snr.min(gamma) / snr, tol);
        assert_close1("min-snr v", w(Prediction::V), snr.min(gamma) / (snr + 1.0), tol);
        assert_close1("min-snr x0", w(Prediction::Sample), snr.min(gamma), tol);
        let plain = LisaConfig { weighting: Weighting::Snr, ..LisaConfig::default() };
        assert_close1("snr", plain.sample_terms(Prediction::Epsilon, level).unwrap().weight, snr, tol);
        let noisy = LisaConfig { weighting: Weighting::NoiseVariance, ..LisaConfig::default() };
        let w_noise = noisy.sample_terms(Prediction::Epsilon, level).unwrap().weight;
        assert_close1("noise variance", w_noise, level.sigma * level.sigma, tol);
        let unit = LisaConfig::default().sample_terms(Prediction::Epsilon, level).unwrap();
        assert_eq!(unit, SampleTerms::unit());
        let score_space = LisaConfig { target_space: TargetSpace::Score, ..LisaConfig::default() };
        let s = score_space.sample_terms(Prediction::Epsilon, level).unwrap();
        assert_close1("score-space scale", s.target_scale, -1.0 / level.sigma, tol);
    }
    // The noise-variance weight grows with the noise: 0 at a clean sample.
    let noisy = LisaConfig { weighting: Weighting::NoiseVariance, ..LisaConfig::default() };
    let ws: Vec<f64> = [0.0, 0.2, 0.5, 0.9]
        .iter()
        .map(|&t| {
            noisy.sample_terms(Prediction::FlowVelocity, RectifiedFlow::default().level(t).unwrap()).unwrap().weight
        })
        .collect();
    assert!(ws[0] == 0.0 && ws.windows(2).all(|w| w[0] < w[1]), "{ws:?}");
    let flow = RectifiedFlow::default().level(0.4).unwrap();
    let min_snr = LisaConfig { weighting: Weighting::MinSnr { gamma: 5.0 }, ..LisaConfig::default() };
    let w = min_snr.sample_terms(Prediction::FlowVelocity, flow).unwrap().weight;
    assert_close1("min-snr flow", w, flow.snr().min(5.0) * 0.4 * 0.4, Tolerance { abs: 1e-12, rel: 1e-9 });
}

#[test]
fn bad_configs_and_inputs_are_typed_errors() {
    let level = RectifiedFlow::default().level(0.5).unwrap();
    for bad in [
        LisaConfig { lambda: -0.1, ..LisaConfig::default() },
        LisaConfig { lambda: f64::NAN, ..LisaConfig::default() },
        LisaConfig { cosine_eps: 0.0, ..LisaConfig::default() },
        LisaConfig { weighting: Weighting::MinSnr { gamma: -1.0 }, ..LisaConfig::default() },
    ] {
        assert!(matches!(bad.sample_terms(Prediction::Epsilon, level), Err(Error::InvalidArgument { .. })), "{bad:?}");
        let mut g = [0.0; 2];
        assert!(lisa_loss(&bad, &[SampleTerms::unit()], &[1.0, 2.0], &[0.0, 0.0], &mut g).is_err());
    }
    let clean = RectifiedFlow::default().level(0.0).unwrap();
    let snr_cfg = LisaConfig { weighting: Weighting::Snr, ..LisaConfig::default() };
    assert!(matches!(snr_cfg.sample_terms(Prediction::Epsilon, clean), Err(Error::DegenerateNoiseLevel { .. })));
    let mut g = [0.0; 3];
    let cfg = LisaConfig::default();
    assert!(matches!(
        lisa_loss(&cfg, &[SampleTerms::unit(); 2], &[1.0; 3], &[0.0; 3], &mut g),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        lisa_loss(&cfg, &[SampleTerms::unit()], &[1.0; 3], &[0.0; 2], &mut g),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(lisa_loss::<f64>(&cfg, &[], &[], &[], &mut []), Err(Error::Empty { .. })));
    assert!(matches!(
        lisa_loss(&cfg, &[SampleTerms::unit()], &[f64::NAN; 3], &[0.0; 3], &mut g),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(mse_loss(&[f64::INFINITY], &[0.0], &mut [0.0]), Err(Error::NonFinite { .. })));
}

/// `‖d‖²` overflows from `|d| ≈ 1e154` (f64) and `1.8e19` (f32); the distance must not
/// notice: the cosine of `[1e160, 1, 0]` with `[1, 1, 1]` is `1/√3`, whatever the scale.
#[test]
fn cosine_distance_is_exact_for_huge_values() {
    let tau = [1.0f64, 1.0, 1.0];
    let want = 1.0 - 1.0 / 3f64.sqrt();
    let got = cosine_distance(&[1e160, 1.0, 0.0], &tau, 1e-8).unwrap();
    assert!((got - want).abs() < 1e-12, "f64: {got} vs {want}");
    let got = cosine_distance(&[3e20f32, 1.0, 0.0], &[1.0, 1.0, 1.0], 1e-8).unwrap();
    assert!((got as f64 - want).abs() < 1e-6, "f32: {got} vs {want}");
    // The fused loss and its gradient stay finite too.
    let config = LisaConfig { distance: lisa_core::Distance::Cosine, ..LisaConfig::default() };
    let mut grad = [0.0f32; 3];
    let loss = lisa_loss(&config, &[SampleTerms::unit()], &[3e20f32, 1.0, 0.0], &[1.0, 1.0, 1.0], &mut grad).unwrap();
    assert!((loss.distance as f64 - want).abs() < 1e-6, "{}", loss.distance);
    assert!(grad.iter().all(|g| g.is_finite()));
}

proptest! {
    /// `zero_distance` is the distance an all-zero decoder output has with the same `τ`.
    #[test]
    fn zero_distance_is_the_distance_of_a_zero_decoder((d, y, prior, terms) in batch(), cosine in any::<bool>()) {
        let cfg = config(if cosine { Distance::Cosine } else { Distance::Mse }, 0.7);
        let mut grad = vec![0.0; d.len()];
        let l = lisa_loss_fused(&cfg, &terms, &d, &y, &prior, &mut grad).unwrap();
        let zeros = vec![0.0; d.len()];
        let z = lisa_loss_fused(&cfg, &terms, &zeros, &y, &prior, &mut grad).unwrap();
        prop_assert!((l.zero_distance - z.distance).abs() <= 1e-9 * z.distance.abs().max(1.0), "{} vs {}", l.zero_distance, z.distance);
        prop_assert_eq!(z.zero_distance, z.distance);
    }
}
