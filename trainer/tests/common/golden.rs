//! Reading golden files and comparing against them, for the parity tests.

use std::collections::BTreeMap;
use std::path::Path;

use lisa_core::backend::Shape;
use lisa_core::tolerance::REFERENCE_PARITY_F32;
use lisa_trainer::weights::parse_safetensors;

/// Host tensors by name.
pub type Host = BTreeMap<String, (Shape, Vec<f32>)>;

/// The tensors and metadata of a safetensors file.
pub fn read(path: &Path) -> (Host, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let f = parse_safetensors(path, &bytes).unwrap();
    (f.tensors, f.metadata)
}

/// The LISA decoder a golden file was made with, hooked at `hook`: its metadata's
/// `time_sinusoidal_dim` and `channel_floor`, the output convolution zero (torch's too).
pub fn golden_decoder(hook: &str, meta: &BTreeMap<String, String>) -> lisa_trainer::model::DecoderConfig {
    lisa_trainer::model::DecoderConfig {
        hook: Some(hook.parse().unwrap()),
        time_sinusoidal_dim: meta["time_sinusoidal_dim"].parse().unwrap(),
        channel_floor: meta["channel_floor"].parse().unwrap(),
        output_init: lisa_trainer::model::OutputInit::Zero,
    }
}

/// Loads the golden LISA decoder (the `decoder.*` tensors of `lisa`, read from `path`) into
/// `model`'s `lisa.*`: how many tensors.
pub fn load_golden_decoder<B: lisa_core::backend::Backend>(
    model: &mut dyn lisa_trainer::model::DualDenoiser<B>,
    path: &Path,
    lisa: &Host,
) -> usize {
    let dec =
        lisa.iter().filter_map(|(k, v)| k.strip_prefix("decoder.").map(|n| (format!("lisa.{n}"), v.clone()))).collect();
    lisa_trainer::weights::load_tensors(model.store_mut(), path, dec, |n| n.starts_with("lisa."), |_| false).unwrap()
}

/// `max |got − want| ≤ REFERENCE_PARITY_F32 · max |want|`, naming the worst element.
pub fn assert_parity(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs()));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w as f64).abs();
        if e > worst || e.is_nan() {
            (worst, at) = (e, i);
        }
    }
    eprintln!("{what}: max |err| / max |want| = {:.2e}", worst / scale.max(f64::MIN_POSITIVE));
    assert!(
        worst <= REFERENCE_PARITY_F32 * scale,
        "{what}: element {at}: got {}, want {} (max |err| {worst:e}, allowed {:e})",
        got[at],
        want[at],
        REFERENCE_PARITY_F32 * scale
    );
}

/// LISA against a golden `lisa.safetensors` (`lisa`, with its metadata `meta`): the hooked
/// feature, the decoder output, the target `v − prior`, both losses and the torch-autograd
/// gradients of `mse(pred, v) + λ·mse(D(h, t), v − prior)` it holds (`grad.controlnet.*` as
/// the model's `side.*`, `grad.lisa.*`), `v` being the golden `target`. `leaves` are the
/// bound parameters' variables on `tape`. Returns how many gradients were checked.
pub fn assert_lisa_matches<B: lisa_core::backend::Backend>(
    case: &str,
    model: &dyn lisa_trainer::model::DualDenoiser<B>,
    tape: &lisa_trainer::autodiff::Tape<B>,
    leaves: &[(lisa_trainer::params::ParamId, lisa_trainer::autodiff::VarId)],
    out: &lisa_trainer::model::TrainOutputs<B>,
    lisa: &Host,
    meta: &BTreeMap<String, String>,
) -> usize {
    use lisa_core::backend::DType;
    let device = B::device(&out.pred.value);
    let v = |t: &B::Tensor| B::to_vec(t).unwrap();
    let golden = B::from_slice(&lisa["target"].1, &lisa["target"].0, DType::F32, &device).unwrap();
    assert_parity(&format!("{case} hook_feature"), &v(&out.hooked.as_ref().unwrap().value), &lisa["hook_feature"].1);
    let decoded = out.decoded.as_ref().unwrap();
    assert_parity(&format!("{case} lisa_decoded"), &v(&decoded.value), &lisa["lisa_decoded"].1);
    let target = B::sub(&golden, out.prior.as_ref().unwrap()).unwrap();
    assert_parity(&format!("{case} lisa_target"), &v(&target), &lisa["lisa_target"].1);
    let lambda: f32 = meta["lisa_lambda"].parse().unwrap();
    let (l_diff, g_pred) = B::mse_loss(&out.pred.value, &golden).unwrap();
    let (l_lisa, g_dec) = B::mse_loss(&decoded.value, &target).unwrap();
    assert_parity(&format!("{case} loss_diffusion"), &[l_diff], &lisa["loss_diffusion"].1);
    assert_parity(&format!("{case} loss_lisa"), &[l_lisa], &lisa["loss_lisa"].1);
    assert_parity(&format!("{case} loss"), &[l_diff + lambda * l_lisa], &lisa["loss"].1);
    let grads = tape.backward(&[(&out.pred, g_pred), (decoded, B::scale(&g_dec, lambda).unwrap())]).unwrap();
    let mut checked = 0;
    for (key, (_, want)) in lisa.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = key["grad.".len()..].replacen("controlnet.", "side.", 1);
        let id = model.store().find(&name).unwrap_or_else(|| panic!("{case}: no parameter {name}"));
        let var = leaves.iter().find(|(p, _)| *p == id).map(|(_, v)| *v).unwrap();
        let got = B::to_vec(grads.get(var).unwrap_or_else(|| panic!("{case}: no gradient reached {name}"))).unwrap();
        assert_parity(&format!("{case} {key}"), &got, want);
        checked += 1;
    }
    checked
}
