use super::SampleTerms;
use crate::Result;
use crate::real::Real;
use crate::slices::map2_per_sample;

/// The LISA target for a batch: `τ[b, i] = scale_b·(y[b, i] − prior[b, i])`.
///
/// `τ = 0` exactly when the prior already equals the target. The caller guarantees
/// `prior` carries no gradient (see the module's stop-gradient contract).
pub fn lisa_target<F: Real>(terms: &[SampleTerms<F>], y: &[F], prior: &[F], tau: &mut [F]) -> Result<()> {
    map2_per_sample("lisa_target", terms, y, prior, tau, |t| {
        let scale = t.target_scale;
        Ok(move |yv: F, p: F| scale * (yv - p))
    })
}
