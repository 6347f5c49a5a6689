use super::SampleTerms;
use crate::Result;
use crate::real::Real;
use crate::slices::{check_len, per_sample_len};

/// The LISA target for a batch: `τ[b, i] = scale_b·(y[b, i] − prior[b, i])`.
///
/// `τ = 0` exactly when the prior already equals the target. The caller guarantees
/// `prior` carries no gradient (see the module's stop-gradient contract).
pub fn lisa_target<F: Real>(
    terms: &[SampleTerms<F>],
    y: &[F],
    prior: &[F],
    tau: &mut [F],
) -> Result<()> {
    const OP: &str = "lisa_target";
    check_len(OP, y.len(), &[prior.len(), tau.len()])?;
    let per = per_sample_len(OP, y.len(), terms.len())?;
    for (b, t) in terms.iter().enumerate() {
        let r = b * per..(b + 1) * per;
        for ((o, &yv), &p) in tau[r.clone()].iter_mut().zip(&y[r.clone()]).zip(&prior[r]) {
            *o = t.target_scale * (yv - p);
        }
    }
    Ok(())
}
