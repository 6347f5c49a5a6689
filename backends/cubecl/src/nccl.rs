//! NCCL's all-reduce for [`CudaBackend`](crate::CudaBackend) tensors: the collective of
//! data-parallel training on NVIDIA GPUs, in one process (a thread per GPU) or across
//! processes and machines (one process per GPU, the unique id shared by the trainer's
//! rendezvous).
//!
//! cubecl 0.10 has an all-reduce of its own, but it makes its communicator from an id it
//! keeps inside one process, so it cannot join ranks of other processes, and it panics on
//! failure. This module drives NCCL through cudarc (NCCL loaded at run time) on cubecl's
//! buffers: the step's work is finished (`sync`), NCCL sums into a new buffer on a stream of
//! its own, and the wait for it has a deadline. A peer that never comes makes this rank abort
//! its communicator and return an error, never hang.

use std::time::{Duration, Instant};

use cubecl::cuda::CudaRuntime;
use cudarc::driver::sys as cu;
use cudarc::nccl::{result as nccl, sys};
use lisa_core::backend::{Collective, DType, Pending, TensorOps};

use crate::{CubeDevice, CubeTensor, CudaBackend};

/// An NCCL communicator's unique id: made by one rank, handed to all.
pub type NcclId = [u8; 128];

/// Why NCCL cannot run here, or `Ok` when it can (its library loads).
pub fn nccl_available() -> Result<(), String> {
    // SAFETY: loads the library by name and drops it; no NCCL call is made.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err("the NCCL library (libnccl.so.2) was not found: install NCCL (e.g. pip's nvidia-nccl-cu12, or the nccl packages of NVIDIA's repository) and put it on LD_LIBRARY_PATH".into())
    }
}

/// A fresh unique id for a communicator (NCCL must be available: [`nccl_available`]).
pub fn nccl_unique_id() -> Result<NcclId, String> {
    nccl_available()?;
    let id = nccl::get_uniqueid().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The first failure of any rank of an in-process group: every rank's waits poll it, so that a
/// rank that fails ends the others' NCCL calls at once instead of at the timeout.
pub type GroupFailure = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// The device's context, handed to the thread that joins the communicator.
struct SendContext(cu::CUcontext);
// SAFETY: a CUDA context handle may be made current on any thread.
unsafe impl Send for SendContext {}

/// A raw communicator handed from the thread that made it (the handle is a plain pointer NCCL
/// lets any thread use).
struct SendComm(sys::ncclComm_t);
// SAFETY: see above; the communicator is used by one thread at a time.
unsafe impl Send for SendComm {}

/// One rank of an NCCL communicator, on one CUDA device.
pub struct NcclRank {
    comm: sys::ncclComm_t,
    stream: cu::CUstream,
    context: cu::CUcontext,
    cu_device: cu::CUdevice,
    /// The in-process group's failure, shared by its ranks (None across processes, where the
    /// trainer's watched connections carry it).
    group: Option<GroupFailure>,
    device: CubeDevice<CudaRuntime>,
    rank: usize,
    world: usize,
    timeout: Duration,
    broken: Option<String>,
    /// Started reductions: ticket, the source buffer (kept alive until NCCL has read it), the
    /// result's buffer and shape.
    in_flight: Vec<(u64, cubecl::server::Handle, cubecl::server::Handle, lisa_core::backend::Shape)>,
    next_ticket: u64,
}

// SAFETY: the communicator, stream and context are used by the thread that holds the rank,
// one call at a time (every method takes `&mut self` or reads plain fields); NCCL and the CUDA
// driver allow their handles to move between threads.
unsafe impl Send for NcclRank {}

fn cuda(what: &str, r: cu::CUresult) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS { Ok(()) } else { Err(format!("{what}: {r:?}")) }
}

impl NcclRank {
    /// Joins communicator `id` as `rank` of `world` on `device` (its CUDA device index is
    /// the one NCCL uses). Waits for every rank to join, at most `timeout`. `group`: the
    /// shared failure of an in-process group (None across processes).
    pub fn new(
        id: &NcclId,
        rank: usize,
        world: usize,
        device: CubeDevice<CudaRuntime>,
        group: Option<GroupFailure>,
        timeout: Duration,
    ) -> Result<Self, String> {
        nccl_available()?;
        let ordinal = device.device.index;
        let mut context = std::ptr::null_mut();
        let mut stream = std::ptr::null_mut();
        let mut cu_device = 0;
        // SAFETY: plain driver calls on out-pointers we own; the primary context is the one
        // cubecl's client uses for this device (released in `drop`).
        unsafe {
            cuda("cuDeviceGet", cu::cuDeviceGet(&mut cu_device, ordinal as i32))?;
            cuda("cuDevicePrimaryCtxRetain", cu::cuDevicePrimaryCtxRetain(&mut context, cu_device))?;
            cuda("cuCtxSetCurrent", cu::cuCtxSetCurrent(context))?;
            cuda("cuStreamCreate", cu::cuStreamCreate(&mut stream, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32))?;
        }
        let unique = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        // ncclCommInitRank returns when every rank has joined: it runs on a thread of its own
        // so that a rank that never comes is an error after `timeout`, not a hang (the
        // thread is then left blocked; the process is about to end with the error).
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = SendContext(context);
        std::thread::spawn(move || {
            let ctx = ctx;
            let mut comm = std::mem::MaybeUninit::uninit();
            // SAFETY: the device's context is made current on this thread; `comm` is written
            // by NCCL on success; every rank passes the same id.
            let made = unsafe {
                let _ = cu::cuCtxSetCurrent(ctx.0);
                nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, unique, rank as i32)
                    .map(|_| SendComm(comm.assume_init()))
            };
            let _ = tx.send(made.map_err(|e| format!("{e:?}")));
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(comm)) => comm.0,
            Ok(Err(e)) => return Err(format!("ncclCommInitRank (rank {rank} of {world}, GPU {ordinal}): {e}")),
            Err(_) => {
                return Err(format!(
                    "rank {rank} waited {:.0} s for the other ranks to join NCCL's communicator (a rank failed, stopped or cannot reach this one)",
                    timeout.as_secs_f64()
                ));
            }
        };
        Ok(Self {
            comm,
            stream,
            context,
            cu_device,
            group,
            device,
            rank,
            world,
            timeout,
            broken: None,
            in_flight: Vec::new(),
            next_ticket: 0,
        })
    }

    /// Ends this rank's communicator with `why` (its pending and future calls fail).
    fn break_with(&mut self, why: String) -> String {
        if self.broken.is_none() {
            // SAFETY: aborting a live communicator; it is not used afterwards.
            let _ = unsafe { nccl::comm_abort(self.comm) };
            self.broken = Some(why.clone());
        }
        why
    }

    /// Waits for this rank's NCCL stream, at most the timeout. Past it, when NCCL reports an
    /// error, or when another rank of the in-process group failed, it aborts the communicator
    /// (so that no kernel keeps waiting for a peer) and says why.
    fn wait_stream(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(why) = self.group.as_ref().and_then(|g| g.lock().unwrap_or_else(|e| e.into_inner()).clone()) {
                return Err(self.break_with(why));
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; NCCL writes the out-parameter.
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
            if !matches!(async_error, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                return Err(
                    self.break_with(format!("NCCL reported {async_error:?} (a peer failed or the network broke)"))
                );
            }
            // SAFETY: `self.stream` is a live stream of this rank's context.
            let r = unsafe { cu::cuStreamQuery(self.stream) };
            match r {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                cu::CUresult::CUDA_ERROR_NOT_READY => {
                    return Err(self.break_with(format!(
                        "rank {} waited {:.0} s in an NCCL all-reduce: a rank failed or stopped answering",
                        self.rank,
                        self.timeout.as_secs_f64()
                    )));
                }
                other => return Err(format!("the NCCL stream failed: {other:?}")),
            }
        }
    }

    /// Queues the sum of `x` on this rank's NCCL stream once the device has finished the
    /// work that wrote it; returns its ticket without waiting for NCCL.
    fn start(&mut self, x: CubeTensor<CudaRuntime>) -> Result<u64, String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        if let Some(why) = self.group.as_ref().and_then(|g| g.lock().unwrap_or_else(|e| e.into_inner()).clone()) {
            return Err(self.break_with(why));
        }
        if x.dtype != DType::F32 {
            return Err(format!("all-reduce of a {} tensor: lisa reduces f32 gradients", x.dtype));
        }
        let n = x.len();
        // The kernels that wrote `x` are done before NCCL reads it (cubecl's streams are its
        // own, so the whole device is waited for; the backward queued after this overlaps
        // with NCCL).
        let client = &self.device.client;
        let out = client.empty(n.max(1) * 4);
        let src = client.get_resource(x.handle.clone()).map_err(|e| format!("{e:?}"))?.resource().ptr;
        let dst = client.get_resource(out.clone()).map_err(|e| format!("{e:?}"))?.resource().ptr;
        // After the allocation: a stream-ordered allocation on cubecl's stream is complete
        // before NCCL's stream writes into it.
        CudaBackend::sync(&self.device).map_err(|e| e.to_string())?;
        // SAFETY: `src` holds `n` f32 values and `dst` room for them, both on this rank's
        // device and both kept alive in `in_flight` until the stream has passed them; the
        // context is this device's primary one; the stream is ours.
        unsafe {
            cuda("cuCtxSetCurrent", cu::cuCtxSetCurrent(self.context))?;
            nccl::all_reduce(
                src as *const std::ffi::c_void,
                dst as *mut std::ffi::c_void,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream as sys::cudaStream_t,
            )
            .map_err(|e| format!("ncclAllReduce: {e:?}"))?;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.in_flight.push((ticket, x.handle, out, x.shape));
        Ok(ticket)
    }

    /// The sum behind `ticket` (every reduction started before it is done too: one stream).
    fn finish_ticket(&mut self, ticket: u64) -> Result<CubeTensor<CudaRuntime>, String> {
        self.wait_stream()?;
        let at = self
            .in_flight
            .iter()
            .position(|e| e.0 == ticket)
            .ok_or_else(|| format!("no NCCL reduction with ticket {ticket} is in flight"))?;
        let (_, _source, out, shape) = self.in_flight.remove(at);
        // A new buffer: cubecl buffers are never written by an op that did not allocate them.
        Ok(CubeTensor { handle: out, shape, dtype: DType::F32, device: self.device.clone() })
    }
}

fn backend_error(message: String) -> lisa_core::Error {
    lisa_core::Error::Backend { op: "all_reduce", message }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        // SAFETY: the communicator and stream are live and used by no one else now.
        unsafe {
            if self.broken.is_none() {
                let _ = nccl::comm_destroy(self.comm);
            }
            let _ = cu::cuStreamDestroy_v2(self.stream);
            let _ = cu::cuDevicePrimaryCtxRelease_v2(self.cu_device);
        }
    }
}

impl Collective<CudaBackend> for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, x: &mut CubeTensor<CudaRuntime>) -> lisa_core::Result<()> {
        let ticket = self.start(x.clone()).map_err(backend_error)?;
        *x = self.finish_ticket(ticket).map_err(backend_error)?;
        Ok(())
    }
    fn start_all_reduce(&mut self, x: CubeTensor<CudaRuntime>) -> lisa_core::Result<Pending<CubeTensor<CudaRuntime>>> {
        self.start(x).map(Pending::Started).map_err(backend_error)
    }
    fn wait(&mut self, pending: Pending<CubeTensor<CudaRuntime>>) -> lisa_core::Result<CubeTensor<CudaRuntime>> {
        match pending {
            Pending::Done(x) => Ok(x),
            Pending::Started(ticket) => self.finish_ticket(ticket).map_err(backend_error),
        }
    }
    fn abort(&mut self, why: &str) {
        let why = format!("rank {} failed: {why}", self.rank);
        if let Some(group) = &self.group {
            group.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| why.clone());
        }
        self.break_with(why);
    }
    fn transport(&self) -> &'static str {
        "NCCL"
    }
}
