//! The decomposition conditional = prior + likelihood, in prediction and score units.

mod common;

use common::assert_close;
use lisa_core::schedule::{BetaSchedule, DiscreteVp, RectifiedFlow};
use lisa_core::score::{
    conditional, guided, guided_from_predictions, likelihood, likelihood_score_batch, likelihood_score_scale,
};
use lisa_core::tolerance::{F64_MATH, Tolerance};
use lisa_core::{NoiseLevel, Prediction};
use proptest::prelude::*;

fn values(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-4.0f64..4.0, n)
}

fn any_level() -> impl Strategy<Value = NoiseLevel<f64>> {
    prop_oneof![
        (0usize..999)
            .prop_map(|t| DiscreteVp::<f64>::new(BetaSchedule::SD_SCALED_LINEAR, 1000).unwrap().level(t).unwrap()),
        (0.02f64..0.98).prop_map(|t| RectifiedFlow::default().level(t).unwrap()),
    ]
}

proptest! {
    #[test]
    fn decomposition_identity(cond in values(16), prior in values(16)) {
        let mut lik = vec![0.0; 16];
        likelihood(&cond, &prior, &mut lik).unwrap();
        let mut back = vec![0.0; 16];
        conditional(&prior, &lik, &mut back).unwrap();
        assert_close("prior + likelihood", &back, &cond, F64_MATH);
        guided(&prior, &lik, 0.0, &mut back).unwrap();
        assert_close("w = 0", &back, &prior, F64_MATH);
    }

    #[test]
    fn guidance_forms_agree(cond in values(8), prior in values(8), w in -2.0f64..8.0) {
        let mut lik = vec![0.0; 8];
        likelihood(&cond, &prior, &mut lik).unwrap();
        let (mut a, mut b) = (vec![0.0; 8], vec![0.0; 8]);
        guided(&prior, &lik, w, &mut a).unwrap();
        guided_from_predictions(&prior, &cond, w, &mut b).unwrap();
        assert_close("guided", &a, &b, Tolerance { abs: 1e-12, rel: 1e-12 });
    }

    #[test]
    fn likelihood_score_is_score_of_conditional_minus_score_of_prior(
        level in any_level(), kind in prop::sample::select(Prediction::ALL.to_vec()),
        x_t in values(4), cond in values(4), prior in values(4)) {
        let to_score = kind.to_score(level).unwrap();
        let want: Vec<f64> = (0..4).map(|i| to_score.apply(x_t[i], cond[i]) - to_score.apply(x_t[i], prior[i])).collect();
        let mut got = vec![0.0; 4];
        likelihood_score_batch(kind, &[level], &cond, &prior, &mut got).unwrap();
        let scale = 1.0 / level.sigma.min(level.alpha).powi(2);
        assert_close("likelihood score", &got, &want, Tolerance { abs: 1e-10 * scale, rel: 1e-9 });
    }
}

#[test]
fn epsilon_likelihood_is_minus_sigma_times_likelihood_score() {
    let level = DiscreteVp::<f64>::new(BetaSchedule::DDPM_LINEAR, 1000).unwrap().level(400).unwrap();
    let b = likelihood_score_scale(Prediction::Epsilon, level).unwrap();
    assert!(F64_MATH.accepts(b, -1.0 / level.sigma));
    let flow = RectifiedFlow::default().level(0.3).unwrap();
    let b = likelihood_score_scale(Prediction::FlowVelocity, flow).unwrap();
    assert!(F64_MATH.accepts(b, -(1.0 - 0.3) / 0.3));
}

#[test]
fn mismatched_lengths_are_errors() {
    let mut out = [0.0; 3];
    assert!(likelihood(&[1.0, 2.0, 3.0], &[1.0, 2.0], &mut out).is_err());
    assert!(guided(&[1.0; 3], &[1.0; 3], 2.0, &mut out[..2]).is_err());
}
