use crate::Result;
use crate::backend::AdamWParams;
use crate::slices::check_len;

/// One AdamW step in place over slices (see [`AdamWParams`] for the equations).
pub fn adamw_update_slices(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    hp: &AdamWParams,
) -> Result<()> {
    hp.validate()?;
    check_len("adamw_update", param.len(), &[m.len(), v.len(), grad.len()])?;
    let (c1, c2) = hp.bias_corrections();
    let decay = 1.0 - hp.lr * hp.weight_decay;
    for i in 0..param.len() {
        let g = grad[i];
        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
        let m_hat = m[i] / c1;
        let v_hat = v[i] / c2;
        param[i] = param[i] * decay - hp.lr * m_hat / (num_traits::Float::sqrt(v_hat) + hp.eps);
    }
    Ok(())
}
