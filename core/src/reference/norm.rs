use alloc::vec;
use alloc::vec::Vec;

use super::expect_len;
use crate::backend::Shape;
use crate::backend::geometry::{GroupNormGeometry, GroupNormParams};
use crate::{Error, Result};

/// Group norm forward: returns `(y, mean [n·g], rstd [n·g])` (statistics in f64).
pub fn group_norm(
    x: &[f32],
    x_shape: &Shape,
    gamma: &[f32],
    beta: &[f32],
    params: GroupNormParams,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "group_norm";
    expect_len(OP, x, x_shape)?;
    let c = Shape::new([gamma.len()]);
    let g = GroupNormGeometry::new(OP, x_shape, &c, &Shape::new([beta.len()]), params)?;
    let (len, cpg) = (g.group_len(), g.channels / g.groups);
    let mut y = vec![0.0f32; x.len()];
    let (mut means, mut rstds) = (Vec::new(), Vec::new());
    for (k, chunk) in x.chunks_exact(len).enumerate() {
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = chunk.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / len as f64;
        let rstd = 1.0 / num_traits::Float::sqrt(var + params.eps as f64);
        let group = k % g.groups;
        for (i, &v) in chunk.iter().enumerate() {
            let ch = group * cpg + i / g.spatial;
            y[k * len + i] = ((v as f64 - mean) * rstd * gamma[ch] as f64 + beta[ch] as f64) as f32;
        }
        means.push(mean as f32);
        rstds.push(rstd as f32);
    }
    Ok((y, means, rstds))
}

/// Group norm backward from the saved statistics: returns `(dx, dgamma, dbeta)`.
pub fn group_norm_backward(
    x: &[f32],
    x_shape: &Shape,
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    grad_out: &[f32],
    params: GroupNormParams,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "group_norm_backward";
    expect_len(OP, x, x_shape)?;
    expect_len(OP, grad_out, x_shape)?;
    let c = Shape::new([gamma.len()]);
    let g = GroupNormGeometry::new(OP, x_shape, &c, &c, params)?;
    let stats = g.batch * g.groups;
    for s in [mean, rstd] {
        if s.len() != stats {
            return Err(Error::LengthMismatch { op: OP, expected: stats, got: s.len() });
        }
    }
    let (len, cpg) = (g.group_len(), g.channels / g.groups);
    let mut dx = vec![0.0f32; x.len()];
    let (mut dgamma, mut dbeta) = (vec![0.0f64; g.channels], vec![0.0f64; g.channels]);
    for k in 0..stats {
        let (mu, rs) = (mean[k] as f64, rstd[k] as f64);
        let group = k % g.groups;
        let ch = |i: usize| group * cpg + i / g.spatial;
        let base = k * len;
        let (mut sum_gh, mut sum_gh_xh) = (0.0f64, 0.0f64);
        for i in 0..len {
            let xh = (x[base + i] as f64 - mu) * rs;
            let go = grad_out[base + i] as f64;
            let gh = go * gamma[ch(i)] as f64;
            sum_gh += gh;
            sum_gh_xh += gh * xh;
            dgamma[ch(i)] += go * xh;
            dbeta[ch(i)] += go;
        }
        let (m_gh, m_gh_xh) = (sum_gh / len as f64, sum_gh_xh / len as f64);
        for i in 0..len {
            let xh = (x[base + i] as f64 - mu) * rs;
            let gh = grad_out[base + i] as f64 * gamma[ch(i)] as f64;
            dx[base + i] = (rs * (gh - m_gh - xh * m_gh_xh)) as f32;
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    Ok((dx, f(dgamma), f(dbeta)))
}
