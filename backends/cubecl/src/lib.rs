//! # lisa-cubecl
//!
//! One `lisa` backend for every [cubecl](https://github.com/tracel-ai/cubecl) runtime:
//! [`CubeBackend<R>`] implements every op of the [`lisa_core::backend`] traits as `#[cube]`
//! kernels, generic over the runtime `R`. The features `wgpu` and `cuda` each add a thin
//! alias ([`WgpuBackend`], [`CudaBackend`]) over the same generic code.
//!
//! - Storage: contiguous row-major buffers of `f32`, `f16` or `bf16`. Kernels read the
//!   storage type, compute in `f32` and round once on the store, so a half-precision tensor
//!   holds what the CPU backend would hold. A dtype is checked against the device's
//!   properties *before* any launch ([`lisa_core::backend::TensorOps::supports_dtype`]): WGSL has no `bf16`, and
//!   launching it there would fail on the device thread, not in the caller.
//! - Devices: [`CubeDevice::try_new`] creates the client and turns the runtime's panics (no
//!   adapter, no CUDA driver) into an [`Unavailable`] error; [`CubeBackend::probe`] tells
//!   whether a runtime can run here at all.
//! - Kernels: vectorised elementwise maps (4 lanes where the length allows), broadcasting
//!   binary ops, shared-memory tree reductions, a tiled shared-memory matmul (batched,
//!   either operand transposed), conv2d as im2col/col2im + that matmul, group norm, nearest
//!   upsampling, channel concat/slice, the fused LISA loss and AdamW update, and Philox
//!   normals that equal [`lisa_core::rng::normal_at`] element by element.
//!
//! ```ignore
//! use lisa_core::backend::prelude::*;
//! type B = lisa_cubecl::WgpuBackend;
//! let device = B::probe().expect("no wgpu adapter");
//! let x = B::random_normal(&[2, 3].into(), 7, lisa_core::backend::DType::F32, &device)?;
//! ```

mod backend;
mod device;
mod kernels;
mod launch;
mod precision;
mod tensor;

pub use backend::CubeBackend;
pub use device::{CubeDevice, Unavailable};
pub use precision::{F32_GEMM_KERNELS, F32Matmul, HalfMatmul, cubek_refusals, f32_matmul, half_matmul, set_f32_matmul};
pub use tensor::CubeTensor;

/// The wgpu runtime type, for [`skip_unless_available`] and [`CubeDevice`].
#[cfg(feature = "wgpu")]
pub use cubecl::wgpu::WgpuRuntime;

/// The CUDA runtime type.
#[cfg(feature = "cuda")]
pub use cubecl::cuda::{CudaDevice, CudaRuntime};

/// The wgpu runtime (Vulkan, Metal, DX12, or lavapipe's software Vulkan).
#[cfg(feature = "wgpu")]
pub type WgpuBackend = CubeBackend<cubecl::wgpu::WgpuRuntime>;

/// NCCL's all-reduce on CUDA tensors (data-parallel training).
#[cfg(feature = "cuda")]
pub mod nccl;

/// The CUDA runtime (the driver and NVRTC are loaded at run time).
#[cfg(feature = "cuda")]
pub type CudaBackend = CubeBackend<cubecl::cuda::CudaRuntime>;

/// The test policy for a GPU runtime: `None` when `R` has a device here; otherwise
/// `Some(reason)` to skip locally, and a panic when `CI=true` (a green CI must prove the
/// kernels ran).
pub fn skip_unless_available<R: cubecl::Runtime>() -> Option<String> {
    match CubeBackend::<R>::probe() {
        Ok(_) => None,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI=true, so this must run: {e}"),
        Err(e) => Some(e.to_string()),
    }
}
