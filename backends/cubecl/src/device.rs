//! A cubecl device and its compute client; probing without panicking.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use cubecl::prelude::*;
use cubecl_common::device::Device as _;
use lisa_core::backend::DType;

/// A device of runtime `R` with its compute client (cheap to clone).
pub struct CubeDevice<R: Runtime> {
    /// The runtime's device id.
    pub device: R::Device,
    /// The client that queues kernels on it.
    pub client: ComputeClient<R>,
}

/// A runtime that cannot run here: no adapter, no driver. Says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The runtime's name.
    pub runtime: &'static str,
    /// What the runtime reported.
    pub reason: String,
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the {} runtime is not available on this machine: {}", self.runtime, self.reason)
    }
}

impl std::error::Error for Unavailable {}

/// Serialises probes: the panic hook is process-wide.
static PROBE: Mutex<()> = Mutex::new(());

impl<R: Runtime> CubeDevice<R> {
    /// Creates the client of `device`. cubecl panics when a runtime has no device (wgpu
    /// without an adapter, CUDA without a driver); that panic is caught here, kept off
    /// stderr, and returned as [`Unavailable`].
    pub fn try_new(device: R::Device) -> Result<Self, Unavailable> {
        let _guard = PROBE.lock().unwrap_or_else(|e| e.into_inner());
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let created = catch_unwind(AssertUnwindSafe(|| R::client(&device)));
        std::panic::set_hook(hook);
        match created {
            Ok(client) => Ok(Self { device, client }),
            Err(payload) => {
                let reason = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the runtime panicked while creating its client".into());
                let reason = match runtime_name::<R>() {
                    "cuda" => format!("no usable NVIDIA driver or GPU (cubecl-cuda: {reason})"),
                    "wgpu" => format!(
                        "no usable GPU adapter (install a Vulkan driver, e.g. mesa-vulkan-drivers; wgpu: {reason})"
                    ),
                    _ => reason,
                };
                Err(Unavailable { runtime: runtime_name::<R>(), reason })
            }
        }
    }

    /// The runtime's name for this device (`"wgpu<wgsl>"`, `"cuda"`, …).
    pub fn runtime_name(&self) -> &'static str {
        R::name(&self.client)
    }

    /// The bytes cubecl's memory pools hold on the device (they grow to the largest working
    /// set and are reused); `None` when the runtime cannot say.
    pub fn memory_reserved(&self) -> Option<u64> {
        self.client.memory_usage().ok().map(|m| m.bytes_reserved)
    }

    /// The device's total memory in bytes where the runtime reports it (CUDA: the driver's
    /// `cuDeviceTotalMem`); `None` where it does not (wgpu has no such query).
    pub fn total_memory(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = (&self.device as &dyn std::any::Any).downcast_ref::<cubecl::cuda::CudaDevice>() {
            use cudarc::driver::result::device;
            // SAFETY: a plain query of a device the client (made before this) initialised
            // the driver for; the out-value is written by the driver on success.
            return device::get(cuda.index as i32).and_then(|d| unsafe { device::total_mem(d) }).ok().map(|b| b as u64);
        }
        None
    }

    /// Whether the device has tensor-core (cooperative matrix) instructions that multiply
    /// `dtype` inputs and accumulate in f32: the path f16/bf16 matrix products take
    /// ([`crate::half_matmul`]). False for f32 and on devices without them (lavapipe).
    pub fn has_tensor_cores(&self, dtype: DType) -> bool {
        let input = match dtype {
            DType::F32 => return false,
            DType::F16 => half::f16::as_type_native_unchecked().storage_type(),
            DType::BF16 => half::bf16::as_type_native_unchecked().storage_type(),
        };
        let acc = f32::as_type_native_unchecked().storage_type();
        let props = self.client.properties();
        props.features.matmul.cmma.iter().any(|c| c.a_type == input && c.b_type == input && c.cd_type == acc)
    }

    /// Whether kernels can load, compute and store `dtype` here.
    pub fn supports(&self, dtype: DType) -> bool {
        let props = self.client.properties();
        match dtype {
            DType::F32 => props.supports_type(f32::as_type_native_unchecked()),
            DType::F16 => props.supports_type(half::f16::as_type_native_unchecked()),
            DType::BF16 => props.supports_type(half::bf16::as_type_native_unchecked()),
        }
    }
}

/// The name used in messages before a client exists.
pub(crate) fn runtime_name<R: Runtime>() -> &'static str {
    let full = std::any::type_name::<R>();
    if full.contains("Wgpu") {
        "wgpu"
    } else if full.contains("Cuda") {
        "cuda"
    } else {
        "cubecl"
    }
}

impl<R: Runtime> Clone for CubeDevice<R> {
    fn clone(&self) -> Self {
        Self { device: self.device.clone(), client: self.client.clone() }
    }
}

impl<R: Runtime> PartialEq for CubeDevice<R> {
    fn eq(&self, other: &Self) -> bool {
        self.device.to_id() == other.device.to_id()
    }
}

impl<R: Runtime> fmt::Debug for CubeDevice<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CubeDevice({:?})", self.device)
    }
}
