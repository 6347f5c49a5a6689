//! Collectives across the ranks of a data-parallel run: the seam between the trainer's
//! data-parallel step and whatever moves the bytes (NCCL on CUDA devices, threads in one
//! process, sockets between processes).

use super::BackendTypes;
use crate::Result;

/// One rank's handle on a group of `world_size` ranks that reduce tensors together.
///
/// Every rank must call the same collectives in the same order with tensors of the same
/// shape: a collective is a meeting point, and a rank that does not come ends every other
/// rank's call with an error (after the implementation's timeout), never a silent hang.
pub trait Collective<B: BackendTypes> {
    /// This rank, `0 ≤ rank < world_size`.
    fn rank(&self) -> usize;

    /// The ranks in the group.
    fn world_size(&self) -> usize;

    /// `x ← Σ_r x_r` over the ranks, in place. Every rank ends with the same values, bit for
    /// bit (the sum is taken once, in an order the implementation fixes, and shared).
    fn all_reduce_sum(&mut self, x: &mut B::Tensor) -> Result<()>;

    /// Starts `x ← Σ_r x_r` and returns without waiting for it where the transport can (NCCL
    /// on its own stream), so that the caller goes on computing; [`Collective::wait`] gives the
    /// sum. Reductions complete in the order they were started. The default reduces at once.
    fn start_all_reduce(&mut self, x: B::Tensor) -> Result<Pending<B::Tensor>> {
        let mut x = x;
        self.all_reduce_sum(&mut x)?;
        Ok(Pending::Done(x))
    }

    /// The sum a [`Collective::start_all_reduce`] started.
    fn wait(&mut self, pending: Pending<B::Tensor>) -> Result<B::Tensor> {
        match pending {
            Pending::Done(x) => Ok(x),
            Pending::Started(_) => Err(crate::Error::Backend {
                op: "all_reduce",
                message: "a reduction this collective did not start".into(),
            }),
        }
    }

    /// This rank's part of the run ended normally: leaving the group now breaks nothing.
    fn finish(&mut self) {}

    /// This rank failed: the other ranks' next collective ends with an error carrying `why`
    /// (where the transport can tell them; otherwise their timeout does).
    fn abort(&mut self, _why: &str) {}

    /// What carries the reduction, in words (for logs: "NCCL", "threads", "TCP").
    fn transport(&self) -> &'static str;
}

/// An all-reduce started by [`Collective::start_all_reduce`].
#[derive(Debug)]
pub enum Pending<T> {
    /// Reduced already (transports that block).
    Done(T),
    /// In flight: the transport's ticket.
    Started(u64),
}
