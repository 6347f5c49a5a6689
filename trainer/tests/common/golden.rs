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
