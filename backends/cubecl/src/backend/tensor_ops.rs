//! Creation, read-back, casts, fills and seeded normals.

use cubecl::prelude::*;
use lisa_core::backend::{DType, Shape, TensorOps};
use lisa_core::{Error, Result};

use super::{CubeBackend, T, alloc, arg, check_dtype};
use crate::device::CubeDevice;
use crate::kernels::{elementwise, random};
use crate::launch::{grid_1d, vector_width, with_float};
use crate::tensor::{CubeTensor, decode, encode};

impl<R: Runtime> TensorOps for CubeBackend<R> {
    /// Panics with the runtime's reason when it cannot run here; [`CubeBackend::probe`]
    /// returns that reason as an error instead.
    fn default_device() -> CubeDevice<R> {
        Self::probe().unwrap_or_else(|e| panic!("{e}"))
    }
    fn supports_dtype(device: &CubeDevice<R>, dtype: DType) -> bool {
        device.supports(dtype)
    }
    fn half_products(device: &CubeDevice<R>, dtype: DType) -> lisa_core::backend::HalfProducts {
        use lisa_core::backend::HalfProducts;
        if device.has_tensor_cores(dtype) { HalfProducts::TensorCores } else { HalfProducts::F32Arithmetic }
    }
    fn memory_capacity(device: &CubeDevice<R>) -> lisa_core::backend::MemoryCapacity {
        use lisa_core::backend::MemoryCapacity;
        device.total_memory().map_or(MemoryCapacity::Unknown, |bytes| MemoryCapacity::Device { bytes })
    }
    fn from_slice(data: &[f32], shape: &Shape, dtype: DType, device: &CubeDevice<R>) -> Result<T<R>> {
        check_dtype("from_slice", device, dtype)?;
        let n = shape.num_elements()?;
        if n != data.len() {
            return Err(Error::LengthMismatch { op: "from_slice", expected: n, got: data.len() });
        }
        let bytes = if data.is_empty() { encode(&[0.0], dtype) } else { encode(data, dtype) };
        let handle = device.client.create_from_slice(&bytes);
        Ok(CubeTensor { handle, shape: shape.clone(), dtype, device: device.clone() })
    }
    fn to_vec(t: &T<R>) -> Result<Vec<f32>> {
        let bytes = t
            .device
            .client
            .read_one(t.handle.clone())
            .map_err(|e| Error::Backend { op: "to_vec", message: format!("{e:?}") })?;
        Ok(decode(&bytes, t.dtype, t.len()))
    }
    fn shape(t: &T<R>) -> Shape {
        t.shape.clone()
    }
    fn dtype(t: &T<R>) -> DType {
        t.dtype
    }
    fn device(t: &T<R>) -> CubeDevice<R> {
        t.device.clone()
    }
    fn reshape(t: &T<R>, shape: &Shape) -> Result<T<R>> {
        let n = shape.num_elements()?;
        if n != t.len() {
            return Err(Error::LengthMismatch { op: "reshape", expected: t.len(), got: n });
        }
        Ok(CubeTensor { shape: shape.clone(), ..t.clone() })
    }
    fn cast(t: &T<R>, dtype: DType) -> Result<T<R>> {
        if t.dtype == dtype {
            return Ok(t.clone());
        }
        check_dtype("cast", &t.device, dtype)?;
        let out = alloc(&t.device, t.shape.clone(), dtype)?;
        if !t.is_empty() {
            let w = vector_width(t.len());
            let (count, dim) = grid_1d(t.len() / w);
            with_float!(t.dtype, I => with_float!(dtype, O => {
                elementwise::convert::launch::<I, O, R>(&t.device.client, count, dim, w, arg(t), arg(&out));
            }));
        }
        Ok(out)
    }
    fn full(shape: &Shape, value: f32, dtype: DType, device: &CubeDevice<R>) -> Result<T<R>> {
        check_dtype("full", device, dtype)?;
        let out = alloc(device, shape.clone(), dtype)?;
        if !out.is_empty() {
            let w = vector_width(out.len());
            let (count, dim) = grid_1d(out.len() / w);
            with_float!(dtype, F => elementwise::fill::launch::<F, R>(&device.client, count, dim, w, arg(&out), value));
        }
        Ok(out)
    }
    fn random_normal(shape: &Shape, seed: u64, dtype: DType, device: &CubeDevice<R>) -> Result<T<R>> {
        check_dtype("random_normal", device, dtype)?;
        let out = alloc(device, shape.clone(), dtype)?;
        if !out.is_empty() {
            let blocks = out.len().div_ceil(4);
            super::u32_of("random_normal", blocks)?;
            let (count, dim) = grid_1d(blocks);
            with_float!(dtype, F => random::random_normal::launch::<F, R>(
                &device.client, count, dim, arg(&out), seed as u32, (seed >> 32) as u32
            ));
        }
        Ok(out)
    }
    fn sync(device: &CubeDevice<R>) -> Result<()> {
        cubecl::future::block_on(device.client.sync())
            .map_err(|e| Error::Backend { op: "sync", message: format!("{e:?}") })
    }
}
