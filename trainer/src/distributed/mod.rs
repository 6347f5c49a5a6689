//! Data-parallel training (docs/distributed.md): every rank holds a copy of the model, takes
//! its shard of each global batch, and averages its gradients with the others' before the
//! same optimizer step, so the weights stay identical on every rank.
//!
//! - The data order and the random draws are the run's, of the *global* batch (`world ×
//!   batch_size` examples): rank `r` takes examples `[r·b, (r+1)·b)` of it and the same rows
//!   of its noise. A run on `N` ranks with batch `b` is therefore the run of one rank with
//!   batch `N·b`, up to the summation order of the gradients' average.
//! - Gradients are averaged in buckets ([`DataParallel::bucket_bytes`], 25 MiB as torch's
//!   DDP), flattened in reverse parameter order (the order the backward finishes them).
//!   Every rank reduces every bucket every step: a parameter without a gradient on some rank
//!   contributes zeros, so no rank waits for a bucket another rank skips.
//! - The step's losses and its non-finite flag are averaged with them: under fp16 loss scaling
//!   every rank skips the same steps.
//! - What moves the bytes is a [`Collective`]: NCCL on CUDA devices (lisa-cubecl's
//!   `NcclRank`), threads of one process ([`thread_group`]), or the TCP connections of the
//!   rendezvous between processes ([`TcpRank`]).

mod host;
mod launch;
mod replicate;
mod tcp;
mod threads;

use std::time::Duration;

use lisa_core::backend::{Backend, Collective, DType, Shape};

pub use launch::{DEFAULT_MASTER_PORT, Launch, Launcher, MAX_WORLD};
pub use replicate::HostWeights;
pub use tcp::{Link, TcpRank, Watch, Watched, rendezvous};
pub use threads::{ThreadRank, thread_group};

use crate::error::{Result, TrainError};

/// Gradient bytes per all-reduce (torch DDP's `bucket_cap_mb` default, 25 MiB).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// How long a rank waits for the others at a collective before it ends the run with an
/// error (torch's NCCL default is 10 min; lisa's covers rank 0 validating a large model
/// while the others wait at the next step).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One rank's part in a data-parallel run: its collective and how gradients are bucketed.
pub struct DataParallel<B: Backend> {
    group: Box<dyn Collective<B> + Send>,
    /// Gradient bytes per all-reduce.
    pub bucket_bytes: usize,
}

/// Which rows of a global batch a rank takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Ranks in the run.
    pub world: usize,
}

impl Shard {
    /// The whole batch (one rank).
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    /// The rows `[rank·n, (rank+1)·n)` of a global batch of `world·n`.
    pub fn rows(&self, n: usize) -> std::ops::Range<usize> {
        self.rank * n..(self.rank + 1) * n
    }
}

impl<B: Backend> DataParallel<B> {
    /// A rank of the group `group`.
    pub fn new(group: Box<dyn Collective<B> + Send>) -> Self {
        Self { group, bucket_bytes: DEFAULT_BUCKET_BYTES }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Ranks in the run.
    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    /// What carries the all-reduce ("NCCL", "threads", "TCP").
    pub fn transport(&self) -> &'static str {
        self.group.transport()
    }

    /// This rank's rows of each global batch.
    pub fn shard(&self) -> Shard {
        Shard { rank: self.rank(), world: self.world_size() }
    }

    /// `g ← (1/N)·Σ_r g_r` for every slot, in buckets of about [`Self::bucket_bytes`];
    /// `like[i]` gives slot `i`'s shape (a missing gradient is reduced as zeros, and comes
    /// back as the average).
    pub fn average_gradients(&mut self, grads: &mut [Option<B::Tensor>], like: &[&B::Tensor]) -> Result<()> {
        let mut overlap = Overlap::new(self, like)?;
        for (slot, g) in grads.iter_mut().enumerate() {
            if let Some(g) = g.take() {
                overlap.ready(slot, g)?;
            }
        }
        overlap.finish(grads)
    }

    /// `v ← (1/N)·Σ_r v_r` for host values (a step's losses), through the device.
    pub fn average(&mut self, values: &mut [f32], device: &B::Device) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut t = B::from_slice(values, &Shape::new([values.len()]), DType::F32, device)?;
        self.group.all_reduce_sum(&mut t)?;
        let inverse = 1.0 / self.world_size() as f32;
        for (v, s) in values.iter_mut().zip(B::to_vec(&t)?) {
            *v = s * inverse;
        }
        Ok(())
    }

    /// Checks that every rank holds the same `fingerprint` (its run's position, settings and
    /// weights), so that ranks built from different files or resumed from different
    /// checkpoints stop before their first step. Exact in f32: each 4-bit digit and its
    /// square are summed (equal sums of values and of squares mean equal values).
    pub fn agree(&mut self, fingerprint: u64, what: &str, device: &B::Device) -> Result<()> {
        let digit = |i: u32| ((fingerprint >> (4 * (i % 16))) & 0xf) as f32;
        // [16 digits, their 16 squares]
        let mut values: Vec<f32> = (0..32).map(|i| if i < 16 { digit(i) } else { digit(i) * digit(i) }).collect();
        let mut t = B::from_slice(&values, &Shape::new([values.len()]), DType::F32, device)?;
        self.group.all_reduce_sum(&mut t)?;
        let world = self.world_size() as f32;
        let sums = B::to_vec(&t)?;
        for (v, s) in values.iter_mut().zip(&sums) {
            *v *= world;
            if *v != *s {
                return Err(TrainError::Config(format!(
                    "the ranks disagree on {what}: they were started from different files, settings or checkpoints (rank {} differs from the others' average)",
                    self.rank()
                )));
            }
        }
        Ok(())
    }

    /// This rank's part ended normally (the collective may close).
    pub fn finish(&mut self) {
        self.group.finish();
    }

    /// This rank failed: the others' next collective ends with `why`.
    pub fn abort(&mut self, why: &str) {
        self.group.abort(why);
    }
}

/// One step's gradient average, bucket by bucket, as the backward finishes the gradients
/// ([`Overlap::ready`]): a bucket starts its all-reduce once each of its slots is final and
/// every bucket before it has started, so that every rank starts the same reductions in the
/// same order whatever order its gradients come in. [`Overlap::finish`] starts the rest
/// (slots that got no gradient on this rank as zeros) and waits for all.
pub struct Overlap<'a, B: Backend> {
    parallel: &'a mut DataParallel<B>,
    /// Slot shapes.
    shapes: Vec<Shape>,
    device: B::Device,
    /// Slots of each bucket, in bucket order.
    plan: Vec<Vec<usize>>,
    /// The gradients final so far, by slot.
    final_grads: Vec<Option<B::Tensor>>,
    /// The next bucket to start.
    next: usize,
    /// Started reductions, in bucket order.
    started: Vec<lisa_core::backend::Pending<B::Tensor>>,
}

impl<'a, B: Backend> Overlap<'a, B> {
    /// A step's average over `parallel`'s ranks for slots shaped like `like`.
    pub fn new(parallel: &'a mut DataParallel<B>, like: &[&B::Tensor]) -> Result<Self> {
        let shapes: Vec<Shape> = like.iter().map(|t| B::shape(t)).collect();
        let mut bytes = Vec::with_capacity(shapes.len());
        for s in &shapes {
            bytes.push(s.num_elements()? * 4);
        }
        let device = like.first().map_or_else(B::default_device, |t| B::device(t));
        let plan = buckets(&bytes, parallel.bucket_bytes);
        Ok(Self { parallel, final_grads: vec![None; shapes.len()], shapes, device, plan, next: 0, started: Vec::new() })
    }

    /// Slot `slot`'s gradient is final on this rank: starts every bucket that is now complete.
    pub fn ready(&mut self, slot: usize, grad: B::Tensor) -> Result<()> {
        let cell = self.final_grads.get_mut(slot).ok_or(TrainError::Internal("a gradient slot out of range"))?;
        *cell = Some(grad);
        while self.next < self.plan.len() && self.plan[self.next].iter().all(|&i| self.final_grads[i].is_some()) {
            self.start_next()?;
        }
        Ok(())
    }

    /// Starts bucket `self.next`: its slots flattened into one f32 vector (zeros for a slot
    /// without a gradient), in bucket order.
    fn start_next(&mut self) -> Result<()> {
        let mut flat = Vec::with_capacity(self.plan[self.next].len());
        for &i in &self.plan[self.next] {
            let n = self.shapes[i].num_elements()?;
            let g = match self.final_grads[i].take() {
                Some(g) if B::dtype(&g) == DType::F32 => g,
                Some(g) => B::cast(&g, DType::F32)?,
                None => B::zeros(&self.shapes[i], DType::F32, &self.device)?,
            };
            flat.push(B::reshape(&g, &Shape::new([n]))?);
        }
        let refs: Vec<&B::Tensor> = flat.iter().collect();
        let joined = if refs.len() == 1 { refs[0].clone() } else { B::concat(&refs, 0)? };
        self.started.push(self.parallel.group.start_all_reduce(joined)?);
        self.next += 1;
        Ok(())
    }

    /// Starts what is left, waits for every bucket and writes each slot's average into
    /// `grads` (every slot is `Some` afterwards).
    pub fn finish(mut self, grads: &mut [Option<B::Tensor>]) -> Result<()> {
        if grads.len() != self.shapes.len() {
            return Err(TrainError::Internal("one shape per gradient slot"));
        }
        while self.next < self.plan.len() {
            self.start_next()?;
        }
        let inverse = 1.0 / self.parallel.world_size() as f32;
        for (bucket, pending) in self.plan.iter().zip(std::mem::take(&mut self.started)) {
            let joined = B::scale(&self.parallel.group.wait(pending)?, inverse)?;
            let mut start = 0;
            for &i in bucket {
                let n = self.shapes[i].num_elements()?;
                grads[i] = Some(B::reshape(&B::narrow(&joined, 0, start, n)?, &self.shapes[i])?);
                start += n;
            }
        }
        Ok(())
    }
}

/// The slots of each bucket: slots taken in reverse order (the order the backward finishes
/// them), a new bucket whenever the next slot would take it past `bucket_bytes` (a slot
/// larger than that is a bucket of its own).
pub fn buckets(bytes: &[usize], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut filled = 0;
    for i in (0..bytes.len()).rev() {
        match out.last_mut() {
            Some(b) if filled + bytes[i] <= bucket_bytes => {
                b.push(i);
                filled += bytes[i];
            }
            _ => {
                out.push(vec![i]);
                filled = bytes[i];
            }
        }
    }
    out
}
