//! # lisa-conformance
//!
//! One test suite for every backend of the [`lisa_core::backend`] traits. Each check is a
//! generic function over `B: Backend` that runs an op on `B` and on the reference backend
//! ([`lisa_core::reference::RefBackend`]) with the same inputs, on shapes that include odd
//! sizes (1, 3, 7, 33), and compares with the tolerance of the storage dtype
//! ([`lisa_core::tolerance::backend_vs_reference`]). Every backward op is also checked against
//! central finite differences of the backend's own forward
//! ([`lisa_core::tolerance::F32_FINITE_DIFFERENCE`]).
//!
//! A backend crate instantiates the whole suite with one line in a test file:
//!
//! ```ignore
//! lisa_conformance::conformance_tests!(lisa_cpu::CpuBackend);
//! ```

pub mod checks;
mod harness;
mod sequence;

pub use harness::{Case, Harness};

/// Expands to one `#[test]` per conformance check, for backend type `$backend`.
///
/// With `skip_unless = f`, each test first calls `f() -> Option<String>`: `Some(reason)`
/// skips it with the reason on stderr (a GPU runtime with no device here). The policy of
/// when a skip is acceptable lives in `f` (e.g. none when `CI=true`). Attributes after
/// `attrs =` go on every test: `cfg_attr(not(has_device), ignore = "…")` makes a suite that
/// cannot run on the build machine report its tests as ignored, not passed
/// (`-- --include-ignored` runs them where the device is).
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::conformance_tests!($backend, skip_unless = (|| -> Option<String> { None }));
    };
    ($backend:ty, skip_unless = $ready:expr $(, attrs = [$($attr:meta),*])?) => {
        $crate::conformance_tests!(@tests $backend, $ready, [$($($attr),*)?];
            creation_and_readback, random_normal_matches_reference, binary_broadcast, affine_axpby_unary,
            unary_backward, reductions, sum_to_shape, softmax, matmul, conv2d_forward, conv2d_backward,
            group_norm, upsample, upsample_conv, concat_and_slice, mse_loss, lisa_loss, adamw, half_precision,
            bad_inputs_are_typed_errors, nan_propagates, gelu_family, permute, narrow_and_concat, matmul_broadcast,
            layer_norm, attention
        );
    };
    (@tests $backend:ty, $ready:expr, $attrs:tt; $($name:ident),* $(,)?) => {
        $($crate::conformance_tests!(@one $backend, $ready, $attrs, $name);)*
    };
    (@one $backend:ty, $ready:expr, [$($attr:meta),*], $name:ident) => {
        #[test]
        $(#[$attr])*
        fn $name() {
            if let Some(reason) = ($ready)() {
                eprintln!("skipped {}: {reason}", stringify!($name));
                return;
            }
            $crate::checks::$name::<$backend>();
        }
    };
}
