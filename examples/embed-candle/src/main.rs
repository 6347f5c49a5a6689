//! Embedding `lisa-core` in candle: candle owns the model, autograd and optimiser; lisa-core
//! supplies the LISA target, loss and gradient on host slices.
//!
//! The toy ControlNet on vectors: a frozen "main" linear map gives the prior ε-prediction
//! from `x_t`; a trainable side branch reads `(x_t, condition, σ_t)` into a feature `h`, whose
//! zero-initialised "zero linear" adds the residual to the prediction, and a tiny decoder
//! (zero-initialised) maps `h` to `decoded`. Candle computes the diffusion MSE; lisa-core
//! computes `λ·MSE(decoded, τ)` with `τ = ε − prior` and `∂L/∂decoded`. That gradient enters
//! candle's graph through the surrogate `sum(decoded · g)` with `g` a constant tensor: its
//! gradient w.r.t. `decoded` is exactly `g`. Plain SGD on candle `Var`s does the rest.
//!
//! Run: `cargo run --release --manifest-path examples/embed-candle/Cargo.toml` (its own
//! workspace, so that the main one never compiles candle).

use candle_core::{D, DType, Device, Tensor, Var};
use lisa_core::lisa::{LisaLoss, SampleTerms, lisa_loss_fused};
use lisa_core::rng::{fill_normal, philox4x32_10};
use lisa_core::schedule::{BetaSchedule, DiscreteVp, add_noise_batch};
use lisa_core::tolerance::{FD_STEP_F32, Tolerance};
use lisa_core::{LisaConfig, NoiseLevel, Prediction};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
const B: usize = 32; // batch
const C: usize = 8; // data channels
const K: usize = 4; // condition classes
const H: usize = 32; // side feature width
const STEPS: u64 = 200;
const LR: f64 = 0.5;

fn randn(seed: u64, shape: (usize, usize), scale: f32, dev: &Device) -> Res<Tensor> {
    let mut v = vec![0.0f32; shape.0 * shape.1];
    fill_normal(seed, 0, &mut v);
    Ok((Tensor::from_vec(v, shape, dev)? * scale as f64)?)
}

/// One training batch: the noised input, the side branch's input and the LISA factors.
struct Batch {
    x_t: Tensor,                  // [B, C]
    side_in: Tensor,              // [B, C + K + 1]: x_t, one-hot condition, σ_t
    eps: Vec<f32>,                // [B, C], the target y = ε
    terms: Vec<SampleTerms<f32>>, // [B]
}

fn make_batch(vp: &DiscreteVp<f32>, config: &LisaConfig, protos: &[f32], seed: u64, dev: &Device) -> Res<Batch> {
    let (mut x0, mut eps, mut x_t) = (vec![0.0f32; B * C], vec![0.0f32; B * C], vec![0.0f32; B * C]);
    fill_normal(seed, 0, &mut x0);
    fill_normal(seed, B as u64 * C as u64, &mut eps);
    let (mut side, mut levels) = (Vec::with_capacity(B * (C + K + 1)), Vec::with_capacity(B));
    for b in 0..B {
        let r = philox4x32_10([b as u32, 0, 0, 0], [seed as u32, 1]);
        let (class, t) = (r[0] as usize % K, r[1] as usize % 1000);
        // Data: the class prototype plus a little spread; the condition is the class.
        for i in 0..C {
            x0[b * C + i] = protos[class * C + i] + 0.1 * x0[b * C + i];
        }
        let level: NoiseLevel<f32> = vp.level(t)?;
        levels.push(level);
        side.extend((0..K).map(|k| if k == class { 1.0 } else { 0.0 }).chain([level.sigma]));
    }
    add_noise_batch(&levels, &x0, &eps, &mut x_t)?;
    let terms = levels.iter().map(|&l| config.sample_terms(Prediction::Epsilon, l)).collect::<Result<_, _>>()?;
    let x_t = Tensor::from_vec(x_t, (B, C), dev)?;
    let side_in = Tensor::cat(&[&x_t, &Tensor::from_vec(side, (B, K + 1), dev)?], D::Minus1)?;
    Ok(Batch { x_t, side_in, eps, terms })
}

/// The frozen main map and the trainable side branch + LISA decoder.
struct Model {
    w_main: Tensor, // [C, C], frozen: a plain tensor, never a Var
    w_side: Var,    // [C + K + 1, H]
    b_side: Var,    // [1, H]
    w_zero: Var,    // [H, C], zero-initialised
    w_dec: Var,     // [H, C], zero-initialised decoder output
    b_dec: Var,     // [1, C]
}

impl Model {
    fn vars(&self) -> [&Var; 5] {
        [&self.w_side, &self.b_side, &self.w_zero, &self.w_dec, &self.b_dec]
    }

    /// `(prediction, prior, decoded)`, each `[B, C]`.
    fn forward(&self, batch: &Batch) -> Res<(Tensor, Tensor, Tensor)> {
        let prior = batch.x_t.matmul(&self.w_main)?.detach(); // [B, C], no-grad main pass
        let h = batch.side_in.matmul(&self.w_side)?.broadcast_add(&self.b_side)?.tanh()?; // [B, H]
        let pred = (&prior + h.matmul(&self.w_zero)?)?; // [B, C], prior + zero-linear residual
        let decoded = h.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?; // [B, C]
        Ok((pred, prior, decoded))
    }
}

/// lisa-core on candle's buffers: the term and `∂L/∂decoded` (`[B, C]`, host).
fn lisa(config: &LisaConfig, batch: &Batch, prior: &Tensor, decoded: &Tensor) -> Res<(LisaLoss<f32>, Vec<f32>)> {
    let (prior, decoded) = (prior.flatten_all()?.to_vec1::<f32>()?, decoded.flatten_all()?.to_vec1::<f32>()?);
    let mut grad = vec![0.0f32; decoded.len()];
    let loss = lisa_loss_fused(config, &batch.terms, &decoded, &batch.eps, &prior, &mut grad)?;
    Ok((loss, grad))
}

fn main() -> Res<()> {
    let dev = Device::Cpu;
    let vp = DiscreteVp::<f32>::new(BetaSchedule::DDPM_LINEAR, 1000)?;
    let config = LisaConfig::default(); // λ = 0.2, τ = ε − prior, MSE
    let mut protos = vec![0.0f32; K * C]; // [K, C] class prototypes
    fill_normal(7, 0, &mut protos);
    let model = Model {
        w_main: (Tensor::eye(C, DType::F32, &dev)? * 0.5)?, // a weak, condition-blind prior
        w_side: Var::from_tensor(&randn(11, (C + K + 1, H), 0.5, &dev)?)?,
        b_side: Var::zeros((1, H), DType::F32, &dev)?,
        w_zero: Var::zeros((H, C), DType::F32, &dev)?,
        w_dec: Var::zeros((H, C), DType::F32, &dev)?,
        b_dec: Var::zeros((1, C), DType::F32, &dev)?,
    };
    let eval = make_batch(&vp, &config, &protos, 999_999, &dev)?; // fixed held-out batch
    let eval_lisa = |m: &Model| -> Res<f32> {
        let (_, prior, decoded) = m.forward(&eval)?;
        Ok(lisa(&config, &eval, &prior, &decoded)?.0.distance)
    };
    // Before training, residual and decoder output are zero: LISA distance = MSE = mean(τ²).
    let lisa_before = eval_lisa(&model)?;
    let start = std::time::Instant::now();
    let (mut mse_sum, mut lisa_sum) = (0.0f32, 0.0f32); // over the last 20 steps

    for step in 0..STEPS {
        let batch = make_batch(&vp, &config, &protos, step, &dev)?;
        let (pred, prior, decoded) = model.forward(&batch)?;
        let eps = Tensor::from_slice(&batch.eps, (B, C), &dev)?; // [B, C]
        let mse = (pred - &eps)?.sqr()?.mean_all()?; // diffusion loss, in candle
        let (lisa_loss, grad) = lisa(&config, &batch, &prior, &decoded)?;
        // Inject ∂L/∂decoded: ∂/∂decoded of sum(decoded · g) is g, g a constant [B, C].
        let inject = (&decoded * Tensor::from_vec(grad, (B, C), &dev)?)?.sum_all()?;
        let grads = (&mse + inject)?.backward()?;
        for var in model.vars() {
            if let Some(g) = grads.get(var) {
                var.set(&(var.as_tensor() - (g * LR)?)?)?;
            }
        }
        mse_sum += mse.to_scalar::<f32>()?;
        lisa_sum += lisa_loss.distance;
        if (step + 1) % 20 == 0 {
            let (mse, dist) = (mse_sum / 20.0, lisa_sum / 20.0);
            let weighted = config.lambda as f32 * dist;
            println!(
                "steps {:3}-{step:3}: loss {:.4} = MSE {mse:.4} + λ·LISA {weighted:.4} (LISA distance {dist:.4})",
                step - 19,
                mse + weighted
            );
            (mse_sum, lisa_sum) = (0.0, 0.0);
        }
    }
    let lisa_after = eval_lisa(&model)?;
    println!("{STEPS} steps in {:.2?}; held-out LISA distance {lisa_before:.4} -> {lisa_after:.4}", start.elapsed());
    if lisa_after.is_nan() || lisa_after >= 0.7 * lisa_before {
        return Err(format!("LISA distance did not fall by 30 %: {lisa_before} -> {lisa_after}").into());
    }

    // Gradient check: candle's autograd of the injected term w.r.t. one decoder weight
    // against a central finite difference of lisa-core's loss (the MSE never sees w_dec).
    let (_, prior, decoded) = model.forward(&eval)?;
    let (_, grad) = lisa(&config, &eval, &prior, &decoded)?;
    let inject = (&decoded * Tensor::from_vec(grad, (B, C), &dev)?)?.sum_all()?;
    let autograd =
        inject.backward()?.get(&model.w_dec).ok_or("no gradient for w_dec")?.flatten_all()?.to_vec1::<f32>()?;
    let j = (0..H * C).max_by(|&a, &b| autograd[a].abs().total_cmp(&autograd[b].abs())).unwrap_or(0);
    let w = model.w_dec.flatten_all()?.to_vec1::<f32>()?;
    let lisa_at = |delta: f64| -> Res<f64> {
        let mut v = w.clone();
        v[j] += delta as f32;
        model.w_dec.set(&Tensor::from_vec(v, (H, C), &dev)?)?;
        let (_, prior, decoded) = model.forward(&eval)?;
        Ok(lisa(&config, &eval, &prior, &decoded)?.0.weighted as f64)
    };
    let fd = (lisa_at(FD_STEP_F32)? - lisa_at(-FD_STEP_F32)?) / (2.0 * FD_STEP_F32);
    lisa_at(0.0)?; // restore w_dec
    println!("∂L/∂w_dec[{}, {}]: autograd {:.6e}, finite difference {fd:.6e}", j / C, j % C, autograd[j]);
    // L is quadratic in w_dec, so the central difference is exact up to f32 rounding.
    if !(Tolerance { abs: 1e-6, rel: 1e-3 }).accepts(autograd[j] as f64, fd) {
        return Err(format!("injected gradient {} disagrees with finite difference {fd}", autograd[j]).into());
    }
    Ok(())
}
