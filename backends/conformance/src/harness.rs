//! Inputs made once and handed to both backends, and the comparisons.

use lisa_core::Result;
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_core::reference::{RefBackend, RefDevice, RefTensor};
use lisa_core::rng::fill_normal;
use lisa_core::tolerance::{F32_FINITE_DIFFERENCE, FD_STEP_F32, Tolerance, backend_vs_reference};

/// Creates matching tensors on the backend under test and on the reference.
pub struct Harness<B: Backend> {
    /// The backend's default device.
    pub device: B::Device,
    seed: u64,
}

/// One input: the same values on the backend and on the reference.
pub struct Case<B: Backend> {
    /// On the backend under test.
    pub dev: B::Tensor,
    /// On the reference backend.
    pub reference: RefTensor,
    /// The host values.
    pub host: Vec<f32>,
}

impl<B: Backend> Clone for Case<B> {
    fn clone(&self) -> Self {
        Self { dev: self.dev.clone(), reference: self.reference.clone(), host: self.host.clone() }
    }
}

impl<B: Backend> Default for Harness<B> {
    fn default() -> Self {
        Self { device: B::default_device(), seed: 0x5eed }
    }
}

impl<B: Backend> Harness<B> {
    /// Normal random values of `shape` (a fresh stream per call), stored as `dtype`.
    pub fn randn(&mut self, shape: &[usize], dtype: DType) -> Case<B> {
        let shape = Shape::new(shape);
        let mut host = vec![0.0f32; shape.num_elements().expect("test shape")];
        self.seed += 1;
        fill_normal(self.seed, 0, &mut host);
        self.from_host(host, &shape, dtype)
    }

    /// Uniform-ish positive values in `[lo, lo + 1)` (for sqrt and friends).
    pub fn positive(&mut self, shape: &[usize], lo: f32) -> Case<B> {
        let c = self.randn(shape, DType::F32);
        let host: Vec<f32> = c.host.iter().map(|v| lo + (v.abs() % 1.0)).collect();
        self.from_host(host, &Shape::new(shape), DType::F32)
    }

    /// Both tensors from explicit values.
    pub fn from_host(&self, host: Vec<f32>, shape: &Shape, dtype: DType) -> Case<B> {
        let dev = B::from_slice(&host, shape, dtype, &self.device).expect("backend from_slice");
        let reference = RefBackend::from_slice(&host, shape, dtype, &RefDevice).expect("reference from_slice");
        let host = reference.data().to_vec(); // rounded to dtype
        Case { dev, reference, host }
    }
}

/// Asserts that the backend's result equals the reference's within the dtype's tolerance.
pub fn assert_matches<B: Backend>(what: &str, got: &Result<B::Tensor>, want: &Result<RefTensor>) {
    let (got, want) = match (got, want) {
        (Ok(g), Ok(w)) => (g, w),
        (Err(g), Err(w)) => {
            assert_eq!(
                core::mem::discriminant(g),
                core::mem::discriminant(w),
                "{what}: backend error {g} vs reference error {w}"
            );
            return;
        }
        (g, w) => panic!("{what}: backend gave {g:?}, reference gave {w:?}"),
    };
    assert_eq!(B::shape(got), *want.shape(), "{what}: shape");
    assert_eq!(B::dtype(got), RefBackend::dtype(want), "{what}: dtype");
    let tol = backend_vs_reference(B::dtype(got));
    assert_values(what, &B::to_vec(got).expect("read back"), want.data(), tol);
}

/// Element-by-element comparison naming the worst element.
pub fn assert_values(what: &str, got: &[f32], want: &[f32], tol: Tolerance) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !tol.accepts(g as f64, w as f64) {
            let err = (g as f64 - w as f64).abs();
            if worst.is_none_or(|(_, e)| err > e || err.is_nan()) {
                worst = Some((i, err));
            }
        }
    }
    if let Some((i, err)) = worst {
        panic!("{what}: element {i}: got {}, want {} (|err| {err:e}, tol {tol:?})", got[i], want[i]);
    }
}

/// The most input elements a finite-difference check perturbs (spread over the tensor).
const FD_MAX_PROBES: usize = 48;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Checks `analytic` (the backend's gradient of `⟨r, f(x)⟩`) against central differences of
/// the backend's own forward `f`, on up to [`FD_MAX_PROBES`] elements of `x`.
pub(crate) fn finite_difference<B: Backend>(
    what: &str,
    h: &Harness<B>,
    x: &Case<B>,
    r: &[f32],
    f: impl Fn(&B::Tensor) -> B::Tensor,
    analytic: &B::Tensor,
) {
    let analytic = B::to_vec(analytic).expect("read back");
    let shape = B::shape(&x.dev);
    let n = x.host.len();
    let stride = n.div_ceil(FD_MAX_PROBES).max(1);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for i in (0..n).step_by(stride) {
        let eval = |delta: f64| {
            let mut probe = x.host.clone();
            probe[i] = (probe[i] as f64 + delta) as f32;
            let t = B::from_slice(&probe, &shape, DType::F32, &h.device).expect("probe");
            dot(&B::to_vec(&f(&t)).expect("read back"), r)
        };
        want.push(((eval(FD_STEP_F32) - eval(-FD_STEP_F32)) / (2.0 * FD_STEP_F32)) as f32);
        got.push(analytic[i]);
    }
    assert_values(&format!("{what} vs finite differences"), &got, &want, F32_FINITE_DIFFERENCE);
}

/// `Ok` values unwrapped with the op's name.
pub(crate) fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: unexpected error {e}"))
}
