//! An in-process group: ranks are threads of one process that meet in shared memory. It
//! carries `lisa train --gpus N` on backends whose devices NCCL does not reach (the CPU, wgpu)
//! and the tests of the data-parallel step, which run without a GPU.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lisa_core::backend::{Backend, Collective};

use super::host::{reduce_through_host, sum_in_rank_order};

/// What the ranks of one [`thread_group`] share.
struct Shared {
    state: Mutex<Meeting>,
    arrived: Condvar,
    world: usize,
    timeout: Duration,
}

/// The meeting in progress: each rank's contribution, the last result, and why the group
/// broke (a rank left, a rank timed out, contributions of different sizes).
struct Meeting {
    /// Meetings completed.
    generation: u64,
    contributions: Vec<Option<Vec<f32>>>,
    result: Arc<Vec<f32>>,
    broken: Option<String>,
    /// Ranks whose handle is gone (finished or failed).
    left: Vec<bool>,
}

/// One rank of an in-process group (move it into the rank's thread). Dropping it before the
/// group's last meeting, as a thread that fails does, ends the other ranks' waits with an
/// error naming this rank.
pub struct ThreadRank {
    shared: Arc<Shared>,
    rank: usize,
    done: bool,
}

/// `world` ranks that meet in this process; a rank that waits longer than `timeout` for the
/// others ends the group with an error.
pub fn thread_group(world: usize, timeout: Duration) -> Vec<ThreadRank> {
    let shared = Arc::new(Shared {
        state: Mutex::new(Meeting {
            generation: 0,
            contributions: vec![None; world],
            result: Arc::new(Vec::new()),
            broken: None,
            left: vec![false; world],
        }),
        arrived: Condvar::new(),
        world,
        timeout,
    });
    (0..world).map(|rank| ThreadRank { shared: shared.clone(), rank, done: false }).collect()
}

impl ThreadRank {
    fn lock(&self) -> MutexGuard<'_, Meeting> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Σ_r values_r` over the ranks, summed in rank order once and shared.
    pub fn reduce(&mut self, values: Vec<f32>) -> Result<Arc<Vec<f32>>, String> {
        let mut m = self.lock();
        if let Some(why) = &m.broken {
            return Err(why.clone());
        }
        let generation = m.generation;
        m.contributions[self.rank] = Some(values);
        if m.contributions.iter().all(Option::is_some) {
            let parts: Vec<Vec<f32>> = m.contributions.iter_mut().map(|c| c.take().unwrap_or_default()).collect();
            match sum_in_rank_order(&parts) {
                Ok(sum) => {
                    m.result = Arc::new(sum);
                    m.generation += 1;
                }
                Err(why) => m.broken = Some(why),
            }
            self.shared.arrived.notify_all();
        }
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if m.generation != generation {
                return Ok(m.result.clone());
            }
            if let Some(why) = &m.broken {
                return Err(why.clone());
            }
            if let Some(gone) = m.left.iter().position(|&l| l) {
                return Err(format!(
                    "rank {} reduces after rank {gone} finished its run (the ranks took different numbers of steps)",
                    self.rank
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> =
                    (0..self.shared.world).filter(|&r| m.contributions[r].is_none()).map(|r| r.to_string()).collect();
                let why = format!(
                    "rank {} waited {:.0} s for rank(s) {} to reach the same collective (a rank is stuck or stopped)",
                    self.rank,
                    self.shared.timeout.as_secs_f64(),
                    missing.join(", ")
                );
                m.broken = Some(why.clone());
                self.shared.arrived.notify_all();
                return Err(why);
            }
            m = self.shared.arrived.wait_timeout(m, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Marks this rank's part done: dropping it afterwards breaks nothing.
    pub fn finish(&mut self) {
        self.done = true;
    }

    /// Ends every rank's waits with `why` (this rank failed).
    pub fn abort(&mut self, why: &str) {
        let mut m = self.lock();
        if m.broken.is_none() {
            m.broken = Some(format!("rank {} failed: {why}", self.rank));
        }
        self.shared.arrived.notify_all();
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut m = self.lock();
        m.left[self.rank] = true;
        if !self.done && m.broken.is_none() {
            m.broken = Some(format!("rank {} left the group before the run's end (it failed or stopped)", self.rank));
        }
        self.shared.arrived.notify_all();
    }
}

impl<B: Backend> Collective<B> for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&mut self, x: &mut B::Tensor) -> lisa_core::Result<()> {
        reduce_through_host::<B>(x, |values| self.reduce(values).map(|r| r.as_ref().clone()))
    }
    fn finish(&mut self) {
        ThreadRank::finish(self);
    }
    fn abort(&mut self, why: &str) {
        ThreadRank::abort(self, why);
    }
    fn transport(&self) -> &'static str {
        "threads"
    }
}
