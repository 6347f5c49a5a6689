//! A linear probe from side-network features to the condition: how linearly the hooked
//! feature encodes the circle's centre and radius (the paper's "disentangled side features").
//!
//! [`side_features`] runs the side network on examples noised at one fixed timestep and
//! returns the feature map at a hook layer, flattened per example. [`ridge_probe`] fits a ridge
//! regression from those features to targets on the first three quarters of the examples and
//! reports the coefficient of determination `R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)²` per target on the
//! last quarter. The ridge strength is chosen among five values, relative to the features'
//! scale, on a split of the training part, then the probe is refitted on the whole of it.
//!
//! The fit runs in the dual (kernel) form, `ŷ = x·Xᵀ(XXᵀ + αI)⁻¹Y` with centred `X` and `Y`,
//! so its cost grows with the number of examples, not with the feature size (thousands). The
//! linear algebra is a Cholesky solve of an `n×n` system in f64, small enough to write here.

use lisa_core::backend::Backend;

use crate::autodiff::Tape;
use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::model::{DualDenoiser, HookLayer};
use crate::scheduler::{NoiseConfig, NoiseProcess};
use crate::stream::{RunStream, noise_batch_at};

/// Examples per side-network pass (bounds the memory of a probe on many examples).
const CHUNK: usize = 64;

/// The side network's feature at `hook` for each example, noised at timestep fraction
/// `t_fraction` in `[0, 1)` with noise fixed by `seed`: `(values [n·d], d)`.
pub fn side_features<B: Backend>(
    model: &dyn DualDenoiser<B>,
    hook: HookLayer,
    noise: &NoiseConfig,
    examples: &[Example],
    t_fraction: f32,
    seed: u64,
) -> Result<(Vec<f32>, usize)> {
    if !(0.0..1.0).contains(&t_fraction) {
        return Err(TrainError::Config(format!("the probe's timestep fraction {t_fraction} must lie in [0, 1)")));
    }
    let process = NoiseProcess::new(noise)?;
    let mut stream = RunStream::new(seed);
    let (mut values, mut dim) = (Vec::new(), 0);
    for chunk in examples.chunks(CHUNK) {
        let draws = vec![t_fraction; chunk.len()];
        let batch = noise_batch_at(&mut stream, &process, model, true, chunk, 0.0, Some(&draws))?;
        let hint = batch.hint.ok_or(TrainError::Internal("noise_batch_at returns the hints it was asked for"))?;
        let tape = Tape::<B>::new();
        let p = model.store().bind(&tape);
        // [chunk, c, h, w] at the hook.
        let feature = tape.no_grad(|| -> Result<B::Tensor> {
            let (x, hint) = (tape.constant(batch.x_t.clone()), tape.constant(hint));
            let side = model.side(&p, &x, &hint, &batch.cond)?;
            Ok(side.feature(hook)?.value.clone())
        })?;
        let flat = B::to_vec(&feature)?;
        dim = flat.len() / chunk.len();
        values.extend(flat);
    }
    Ok((values, dim))
}

/// The probe's result: `R²` on held-out examples, one per target.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeFit {
    /// Held-out `R²` per target column.
    pub r2: Vec<f64>,
    /// The ridge strength chosen, relative to the mean squared norm of the centred features.
    pub alpha: f64,
}

/// Relative ridge strengths tried.
const ALPHAS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// Fits a ridge probe from `features` (`n` rows of `dim`) to `targets` (`n` rows of `k`) on
/// the first three quarters of the rows and scores it on the last quarter (module docs).
pub fn ridge_probe(features: &[f32], dim: usize, targets: &[Vec<f64>]) -> Result<ProbeFit> {
    let n = targets.len();
    let k = targets.first().map_or(0, Vec::len);
    if n < 8 || dim == 0 || k == 0 || features.len() != n * dim || targets.iter().any(|t| t.len() != k) {
        return Err(TrainError::Mismatch(format!(
            "a ridge probe needs ≥ 8 rows of features and equal-length targets ({n} targets, {} values of dim {dim})",
            features.len()
        )));
    }
    let rows: Vec<&[f32]> = features.chunks_exact(dim).collect();
    let train = n * 3 / 4;
    // The ridge strength: fitted on the first 80 % of the training part, scored on the rest.
    let inner = train * 4 / 5;
    let score = |fit_rows: std::ops::Range<usize>, test_rows: std::ops::Range<usize>, alpha: f64| {
        let r2 = fit_and_score(&rows, targets, fit_rows, test_rows, alpha)?;
        Ok::<_, TrainError>(r2)
    };
    let mut best = (f64::NEG_INFINITY, ALPHAS[0]);
    for &alpha in &ALPHAS {
        let r2 = score(0..inner, inner..train, alpha)?;
        let mean = r2.iter().sum::<f64>() / k as f64;
        if mean > best.0 {
            best = (mean, alpha);
        }
    }
    Ok(ProbeFit { r2: score(0..train, train..n, best.1)?, alpha: best.1 })
}

/// Ridge fit on `fit` rows, `R²` per target on `test` rows.
fn fit_and_score(
    rows: &[&[f32]],
    targets: &[Vec<f64>],
    fit: std::ops::Range<usize>,
    test: std::ops::Range<usize>,
    alpha: f64,
) -> Result<Vec<f64>> {
    let (m, dim, k) = (fit.len(), rows[0].len(), targets[0].len());
    let mean_x: Vec<f64> = (0..dim).map(|j| fit.clone().map(|i| rows[i][j] as f64).sum::<f64>() / m as f64).collect();
    let mean_y: Vec<f64> = (0..k).map(|c| fit.clone().map(|i| targets[i][c]).sum::<f64>() / m as f64).collect();
    let centred = |i: usize| -> Vec<f64> { rows[i].iter().zip(&mean_x).map(|(&v, mu)| v as f64 - mu).collect() };
    let xs: Vec<Vec<f64>> = fit.clone().map(centred).collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    // K = X·Xᵀ + α·(tr K / m)·I, [m, m].
    let mut kernel = vec![0.0; m * m];
    for a in 0..m {
        for b in 0..=a {
            let v = dot(&xs[a], &xs[b]);
            kernel[a * m + b] = v;
            kernel[b * m + a] = v;
        }
    }
    let scale = (0..m).map(|a| kernel[a * m + a]).sum::<f64>() / m as f64;
    for a in 0..m {
        kernel[a * m + a] += alpha * scale.max(f64::MIN_POSITIVE);
    }
    // A = K⁻¹·(Y − ȳ), [m, k].
    let mut rhs: Vec<f64> =
        fit.clone().flat_map(|i| (0..k).map(move |c| (i, c))).map(|(i, c)| targets[i][c] - mean_y[c]).collect();
    cholesky_solve(&mut kernel, m, &mut rhs, k)?;
    let mut sse = vec![0.0; k];
    let mut sst = vec![0.0; k];
    let test_mean: Vec<f64> =
        (0..k).map(|c| test.clone().map(|i| targets[i][c]).sum::<f64>() / test.len().max(1) as f64).collect();
    for i in test {
        let x = centred(i);
        let weights: Vec<f64> = xs.iter().map(|row| dot(row, &x)).collect();
        for c in 0..k {
            let predicted = mean_y[c] + (0..m).map(|a| weights[a] * rhs[a * k + c]).sum::<f64>();
            sse[c] += (targets[i][c] - predicted).powi(2);
            sst[c] += (targets[i][c] - test_mean[c]).powi(2);
        }
    }
    Ok(sse.iter().zip(&sst).map(|(e, t)| if *t > 0.0 { 1.0 - e / t } else { f64::NAN }).collect())
}

/// Solves `A·X = B` in place for symmetric positive definite `a` (`[n, n]`, overwritten by
/// its Cholesky factor) and `b` (`[n, k]`, overwritten by `X`).
fn cholesky_solve(a: &mut [f64], n: usize, b: &mut [f64], k: usize) -> Result<()> {
    for j in 0..n {
        let d = a[j * n + j] - (0..j).map(|p| a[j * n + p] * a[j * n + p]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return Err(TrainError::Mismatch("the ridge probe's system is not positive definite".into()));
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let s = a[i * n + j] - (0..j).map(|p| a[i * n + p] * a[j * n + p]).sum::<f64>();
            a[i * n + j] = s / d;
        }
    }
    for c in 0..k {
        // L·z = b, then Lᵀ·x = z.
        for i in 0..n {
            let s = b[i * k + c] - (0..i).map(|p| a[i * n + p] * b[p * k + c]).sum::<f64>();
            b[i * k + c] = s / a[i * n + i];
        }
        for i in (0..n).rev() {
            let s = b[i * k + c] - (i + 1..n).map(|p| a[p * n + i] * b[p * k + c]).sum::<f64>();
            b[i * k + c] = s / a[i * n + i];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features of `n` rows and `dim` columns from a fixed generator, in [-1, 1).
    fn features(n: usize, dim: usize, seed: u32) -> Vec<f32> {
        (0..n * dim)
            .map(|i| {
                let r = lisa_core::rng::philox4x32_10([i as u32, seed, 0, 0], [7, 9]);
                2.0 * lisa_core::rng::uniform_open(r[0]) - 1.0
            })
            .collect()
    }

    #[test]
    fn a_linear_target_is_recovered_and_an_unrelated_one_is_not() {
        let (n, dim) = (128, 8);
        let x = features(n, dim, 1);
        let noise = features(n, 1, 2);
        let targets: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                let row = &x[i * dim..(i + 1) * dim];
                vec![3.0 * row[0] as f64 - 2.0 * row[5] as f64 + 0.5, noise[i] as f64]
            })
            .collect();
        let fit = ridge_probe(&x, dim, &targets).unwrap();
        assert!(fit.r2[0] > 0.95, "a linear function of the features: {fit:?}");
        assert!(fit.r2[1] < 0.2, "independent noise: {fit:?}");
        assert_eq!(fit, ridge_probe(&x, dim, &targets).unwrap(), "deterministic");
    }

    #[test]
    fn cholesky_solves_a_small_system() {
        // [[4, 2], [2, 3]]·x = [[2], [1]] → x = [0.5, 0].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        cholesky_solve(&mut a, 2, &mut b, 1).unwrap();
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(cholesky_solve(&mut singular, 2, &mut [1.0, 1.0], 1).is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(ridge_probe(&[0.0; 10], 2, &vec![vec![1.0]; 5]).is_err(), "too few rows");
        assert!(ridge_probe(&[0.0; 20], 2, &vec![vec![1.0]; 9]).is_err(), "rows and targets disagree");
    }
}
