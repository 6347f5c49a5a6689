//! Embedding `lisa-core` in another framework.
//!
//! The "framework" here owns its tensors (`ForeignTensor`, storage it allocates, shapes it
//! tracks) and its own tiny model: a per-channel linear decoder `dec(h) = a_c·h + b_c` that
//! plays the LISA decoder. lisa-core never owns a buffer: it reads the framework's storage
//! as slices and writes the gradient into a slice the framework hands it.
//!
//! One step, as in docs/method.md §3: draw t and ε, make x_t, take the target y = ε, a
//! (pretend) frozen prior prediction, the LISA target τ = y − prior, the loss λ·MSE(dec, τ)
//! and ∂L/∂dec; the framework back-propagates that into (a, b) itself and updates them.
//!
//! Run: `cargo run -p lisa-examples --example embed_core`

use lisa_core::lisa::{SampleTerms, lisa_loss_fused, lisa_target};
use lisa_core::rng::fill_normal;
use lisa_core::schedule::{BetaSchedule, DiscreteVp, add_noise_batch};
use lisa_core::{LisaConfig, NoiseLevel, Prediction};

/// A tensor type owned by "another framework": NCHW storage and its dims.
struct ForeignTensor {
    storage: Vec<f32>,
    dims: [usize; 4],
}

impl ForeignTensor {
    fn randn(dims: [usize; 4], seed: u64) -> Self {
        let mut storage = vec![0.0; dims.iter().product()];
        fill_normal(seed, 0, &mut storage);
        Self { storage, dims }
    }
    fn zeros(dims: [usize; 4]) -> Self {
        Self { storage: vec![0.0; dims.iter().product()], dims }
    }
    fn plane(&self) -> usize {
        self.dims[2] * self.dims[3]
    }
    /// The channel of flat element `i`.
    fn channel(&self, i: usize) -> usize {
        (i / self.plane()) % self.dims[1]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dims = [4, 3, 8, 8]; // [batch, channels, h, w]
    let schedule = DiscreteVp::<f32>::new(BetaSchedule::DDPM_LINEAR, 1000)?;
    let config = LisaConfig::default(); // λ = 0.2, prediction-space τ, MSE

    // The framework's trainable decoder: one scale and one shift per channel.
    let (mut a, mut b) = (vec![0.0f32; dims[1]], vec![0.0f32; dims[1]]);
    let lr = 2.0;
    let mut first_loss = None;
    let mut last_loss = 0.0;

    for step in 0..60u64 {
        let x0 = ForeignTensor::randn(dims, 1000 + step);
        let eps = ForeignTensor::randn(dims, 2000 + step);
        // One timestep per sample, and the per-sample LISA factors for it.
        let levels: Vec<NoiseLevel<f32>> =
            (0..dims[0]).map(|i| schedule.level(((step as usize) * 97 + i * 251) % 1000)).collect::<Result<_, _>>()?;
        let terms: Vec<SampleTerms<f32>> =
            levels.iter().map(|&l| config.sample_terms(Prediction::Epsilon, l)).collect::<Result<_, _>>()?;

        let mut x_t = ForeignTensor::zeros(dims);
        add_noise_batch(&levels, &x0.storage, &eps.storage, &mut x_t.storage)?;

        // Pretend frozen prior: it predicts ε well except for a per-channel bias the side
        // branch should explain (the "likelihood" the condition adds).
        let mut prior = ForeignTensor::zeros(dims);
        for (i, p) in prior.storage.iter_mut().enumerate() {
            *p = eps.storage[i] - 0.5 * (x_t.channel(i) as f32 - 1.0);
        }
        // The side feature the decoder reads: here simply x_t.
        let h = &x_t;
        let mut decoded = ForeignTensor::zeros(dims);
        for (i, d) in decoded.storage.iter_mut().enumerate() {
            let c = h.channel(i);
            *d = a[c] * h.storage[i] + b[c];
        }

        // lisa-core on the framework's buffers: target, loss and gradient.
        let mut tau = ForeignTensor::zeros(dims);
        lisa_target(&terms, &eps.storage, &prior.storage, &mut tau.storage)?;
        let mut grad = ForeignTensor::zeros(dims);
        let loss = lisa_loss_fused(&config, &terms, &decoded.storage, &eps.storage, &prior.storage, &mut grad.storage)?;

        // The framework's own backward through dec(h) = a_c·h + b_c, and SGD.
        let (mut ga, mut gb) = (vec![0.0f32; dims[1]], vec![0.0f32; dims[1]]);
        for (i, &g) in grad.storage.iter().enumerate() {
            let c = h.channel(i);
            ga[c] += g * h.storage[i];
            gb[c] += g;
        }
        for c in 0..dims[1] {
            a[c] -= lr * ga[c];
            b[c] -= lr * gb[c];
        }
        if step % 10 == 0 {
            let tau_mean: f32 = tau.storage.iter().sum::<f32>() / tau.storage.len() as f32;
            println!(
                "step {step:2}: LISA term {:.5} (distance {:.5}), mean τ {tau_mean:+.3}",
                loss.weighted, loss.distance
            );
        }
        first_loss.get_or_insert(loss.weighted);
        last_loss = loss.weighted;
    }
    println!("learned shifts b = {b:?} (τ's per-channel mean is −0.5, 0, +0.5)");
    let first = first_loss.unwrap_or(f32::NAN);
    if last_loss.is_nan() || last_loss >= 0.05 * first {
        return Err(format!("LISA term did not fall: {first} -> {last_loss}").into());
    }
    println!("LISA term fell from {first:.5} to {last_loss:.5}");
    Ok(())
}
