//! [`CubeBackend`]: the op traits of [`lisa_core::backend`] on top of the kernels. Each
//! file implements one trait: validate with the core's shared checks, allocate the
//! output, launch.

mod arith;
mod attention;
mod fused;
mod layout;
mod linalg;
mod norm;
mod reduce;
mod tensor_ops;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;

use cubecl::prelude::*;
use lisa_core::backend::{BackendTypes, DType, Shape};
use lisa_core::{Error, Result};

use crate::device::{CubeDevice, Unavailable};
use crate::tensor::CubeTensor;

/// The cubecl backend over runtime `R` (see the crate docs).
pub struct CubeBackend<R: Runtime>(PhantomData<R>);

impl<R: Runtime> Clone for CubeBackend<R> {
    fn clone(&self) -> Self {
        Self(PhantomData)
    }
}

impl<R: Runtime> Default for CubeBackend<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<R: Runtime> std::fmt::Debug for CubeBackend<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CubeBackend<{}>", crate::device::runtime_name::<R>())
    }
}

impl<R: Runtime> BackendTypes for CubeBackend<R> {
    type Device = CubeDevice<R>;
    type Tensor = CubeTensor<R>;
    fn name() -> &'static str {
        crate::device::runtime_name::<R>()
    }
}

/// The default device of each runtime, created once (creating it swaps the process-wide
/// panic hook, which must not happen while other threads run tests).
static DEFAULT_DEVICES: Mutex<Option<HashMap<TypeId, Box<dyn Any + Send>>>> = Mutex::new(None);

impl<R: Runtime> CubeBackend<R> {
    /// The runtime's default device, or why it cannot run here. Call this before
    /// [`lisa_core::backend::TensorOps::default_device`], which panics with this message.
    pub fn probe() -> std::result::Result<CubeDevice<R>, Unavailable> {
        let mut cache = DEFAULT_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        let map = cache.get_or_insert_with(HashMap::new);
        let entry =
            map.entry(TypeId::of::<R>()).or_insert_with(|| Box::new(CubeDevice::<R>::try_new(R::Device::default())));
        entry
            .downcast_ref::<std::result::Result<CubeDevice<R>, Unavailable>>()
            .cloned()
            .unwrap_or_else(|| unreachable!("the cache is keyed by the runtime's TypeId"))
    }
}

/// Shorthand inside the backend.
pub(crate) type T<R> = CubeTensor<R>;

/// An uninitialised tensor of `shape` (buffer ≥ 1 element).
pub(crate) fn alloc<R: Runtime>(device: &CubeDevice<R>, shape: Shape, dtype: DType) -> Result<T<R>> {
    let n = shape.num_elements()?;
    let handle = device.client.empty(n.max(1) * dtype.size_bytes());
    Ok(CubeTensor { handle, shape, dtype, device: device.clone() })
}

/// Refuses a dtype the device cannot run, before anything is launched.
pub(crate) fn check_dtype<R: Runtime>(op: &'static str, device: &CubeDevice<R>, dtype: DType) -> Result<()> {
    if device.supports(dtype) { Ok(()) } else { Err(Error::UnsupportedDType { op, dtype }) }
}

/// `t`'s buffer as a kernel argument of `t.len()` elements.
pub(crate) fn arg<R: Runtime>(t: &T<R>) -> ArrayArg<R> {
    // SAFETY: the handle was allocated with at least max(len, 1) elements of t.dtype.
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), t.len().max(1)) }
}

/// A small `u32` table (shapes, strides) uploaded for one launch.
pub(crate) fn table<R: Runtime>(device: &CubeDevice<R>, values: &[usize]) -> Result<ArrayArg<R>> {
    let mut bytes = Vec::with_capacity(values.len().max(1) * 4);
    for &v in values {
        let v = u32::try_from(v).map_err(|_| Error::invalid("cubecl", format!("size {v} exceeds u32")))?;
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    if bytes.is_empty() {
        bytes.extend_from_slice(&0u32.to_le_bytes());
    }
    let n = bytes.len() / 4;
    let handle = device.client.create_from_slice(&bytes);
    // SAFETY: the buffer holds exactly n u32 values.
    Ok(unsafe { ArrayArg::from_raw_parts(handle, n) })
}

/// An `f32` buffer uploaded for one launch.
pub(crate) fn f32_buffer<R: Runtime>(device: &CubeDevice<R>, values: &[f32]) -> (cubecl::server::Handle, usize) {
    let mut data = values.to_vec();
    if data.is_empty() {
        data.push(0.0);
    }
    (device.client.create_from_slice(&crate::tensor::encode(&data, DType::F32)), data.len())
}

/// Reads an `f32` buffer of `len` values back.
pub(crate) fn read_f32<R: Runtime>(
    device: &CubeDevice<R>,
    handle: cubecl::server::Handle,
    len: usize,
) -> Result<Vec<f32>> {
    let bytes = device.client.read_one(handle).map_err(|e| Error::Backend { op: "read", message: format!("{e:?}") })?;
    Ok(crate::tensor::decode(&bytes, DType::F32, len))
}

/// A `u32` from a size, or a clear error when it does not fit the kernels' 32-bit sizes.
pub(crate) fn u32_of(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(op, format!("size {v} exceeds the 32-bit kernel limit")))
}
