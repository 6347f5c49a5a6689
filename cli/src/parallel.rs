//! `lisa train` on several ranks: `--gpus N` (one process, a thread per GPU) or one process
//! per GPU started by torchrun or SLURM (their variables, read by the library's `Launch`).
//! What is backend-specific lives here: which device a rank trains on and what carries its
//! all-reduce (NCCL on CUDA; threads or the rendezvous's TCP connections elsewhere).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use lisa_core::backend::{Backend, Collective};
use lisa_trainer::distributed::{DataParallel, HostWeights, Launch, TcpRank, rendezvous, thread_group};
use lisa_trainer::session::{self, RunReport};
use lisa_trainer::train::Trainer;
use lisa_trainer::validation::Validator;

use crate::arm::{LoopOptions, Start, prepare_arm};
use crate::config::RunFile;
use crate::progress::RunDisplay;

/// How many ranks a run has and where they live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// One process, one device, no collective.
    Alone,
    /// `--gpus N`: N ranks in this process, one thread each.
    Threads(usize),
    /// One rank of a multi-process run.
    Process(Launch),
}

impl Plan {
    /// The plan the flags and the launcher's variables describe (checked before any work).
    pub fn new(gpus: Option<usize>) -> Result<Self> {
        let launch = Launch::from_env()?;
        Ok(match (launch, gpus) {
            (Some(l), Some(n)) if n > 1 => bail!(
                "--gpus {n} in a run launched with {} processes ({:?}): a launched run has one process per GPU; drop --gpus",
                l.world_size,
                l.launcher
            ),
            (Some(l), _) => Plan::Process(l),
            (None, Some(0)) => bail!("--gpus must be at least 1"),
            (None, Some(n)) => Plan::Threads(n),
            (None, None) => Plan::Alone,
        })
    }
}

/// What a backend brings to data-parallel training.
pub trait RankBackend: Backend {
    /// The device of local rank `local`, given the run's default device `base` (CUDA: GPU
    /// `local`; backends with one device: `base`, shared).
    fn rank_device(base: &Self::Device, local: usize) -> Result<Self::Device>;

    /// Whether each rank has a device of its own (else the ranks share one: the data-parallel
    /// path without its speed-up).
    fn own_devices() -> bool;

    /// The collectives of `devices.len()` ranks in this process.
    fn in_process(devices: &[Self::Device], timeout: Duration) -> Result<Vec<Box<dyn Collective<Self> + Send>>> {
        Ok(thread_group(devices.len(), timeout)
            .into_iter()
            .map(|r| Box::new(r) as Box<dyn Collective<Self> + Send>)
            .collect())
    }

    /// The collective of this process's rank, after the rendezvous (which checks `digest`).
    fn across_processes(
        launch: &Launch,
        digest: &[u8; 32],
        _device: &Self::Device,
        timeout: Duration,
    ) -> Result<Box<dyn Collective<Self> + Send>> {
        let (link, _) = rendezvous(launch, digest, || Ok(Vec::new()), timeout)?;
        Ok(Box::new(TcpRank::new(link)))
    }
}

impl RankBackend for lisa_cpu::CpuBackend {
    fn rank_device(base: &Self::Device, _local: usize) -> Result<Self::Device> {
        Ok(*base)
    }
    fn own_devices() -> bool {
        false
    }
}

#[cfg(feature = "wgpu")]
impl RankBackend for lisa_cubecl::WgpuBackend {
    fn rank_device(base: &Self::Device, _local: usize) -> Result<Self::Device> {
        Ok(base.clone())
    }
    fn own_devices() -> bool {
        false
    }
}

#[cfg(feature = "cuda")]
impl RankBackend for lisa_cubecl::CudaBackend {
    fn rank_device(_base: &Self::Device, local: usize) -> Result<Self::Device> {
        let device = lisa_cubecl::CubeDevice::try_new(lisa_cubecl::CudaDevice { index: local });
        // A launcher that shows each process only its own GPU (srun --gpu-bind, one
        // CUDA_VISIBLE_DEVICES entry per task): that GPU is device 0.
        let bound = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.is_empty() && !v.contains(','));
        match device {
            Err(_) if local > 0 && bound => lisa_cubecl::CubeDevice::try_new(lisa_cubecl::CudaDevice { index: 0 })
                .with_context(|| format!("the one GPU CUDA_VISIBLE_DEVICES shows local rank {local}")),
            other => other.with_context(|| format!("CUDA device {local} (this rank's GPU)")),
        }
    }
    fn own_devices() -> bool {
        true
    }
    fn in_process(devices: &[Self::Device], timeout: Duration) -> Result<Vec<Box<dyn Collective<Self> + Send>>> {
        use lisa_cubecl::nccl::{GroupFailure, NcclRank, nccl_unique_id};
        let id = nccl_unique_id().map_err(anyhow::Error::msg)?;
        let world = devices.len();
        // A rank that fails ends the others' NCCL waits at once.
        let failure = GroupFailure::default();
        // ncclCommInitRank returns when every rank has called it: one thread each.
        let ranks: Vec<Result<NcclRank, String>> = std::thread::scope(|s| {
            let hs: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(r, d)| {
                    let (d, failure) = (d.clone(), failure.clone());
                    s.spawn(move || NcclRank::new(&id, r, world, d, Some(failure), timeout))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("an NCCL rank panicked".into()))).collect()
        });
        ranks
            .into_iter()
            .map(|r| r.map(|r| Box::new(r) as Box<dyn Collective<Self> + Send>).map_err(anyhow::Error::msg))
            .collect()
    }
    fn across_processes(
        launch: &Launch,
        digest: &[u8; 32],
        device: &Self::Device,
        timeout: Duration,
    ) -> Result<Box<dyn Collective<Self> + Send>> {
        use lisa_cubecl::nccl::{NcclRank, nccl_available, nccl_unique_id};
        use lisa_trainer::distributed::Watched;
        nccl_available().map_err(anyhow::Error::msg)?;
        let make_id = || nccl_unique_id().map(|id| id.to_vec()).map_err(lisa_trainer::TrainError::Config);
        let (link, bytes) = rendezvous(launch, digest, make_id, timeout)?;
        let id: [u8; 128] =
            bytes.try_into().map_err(|_| anyhow::anyhow!("rank 0 sent an NCCL id of the wrong size"))?;
        let rank = launch.rank;
        // A peer gone (its process died, or it failed and said so) ends this process too,
        // with the reason, from the communicator's creation on: NCCL alone would wait for it
        // until the timeout.
        let mut watch = link.watch(move |why| {
            eprintln!("error: rank {rank}: {why}; ending this rank");
            std::process::exit(1);
        })?;
        match NcclRank::new(&id, rank, launch.world_size, device.clone(), None, timeout) {
            Ok(nccl) => Ok(Box::new(Watched::new(nccl, watch))),
            Err(e) => {
                watch.abort(&e);
                Err(anyhow::Error::msg(e))
            }
        }
    }
}

/// Trains as `plan` says: [`crate::arm::train_arm`] on one rank, or every rank of this
/// process with its share of each global batch.
pub fn train_ranks<B: RankBackend>(
    file: &RunFile,
    start: Start<B>,
    device: B::Device,
    o: &LoopOptions,
    plan: &Plan,
    timeout: Duration,
) -> Result<RunReport> {
    match plan {
        Plan::Alone => crate::arm::train_arm(file, start, device, o),
        Plan::Process(launch) => {
            let device = B::rank_device(&device, launch.local_rank)?;
            let mut arm = prepare_arm(file, start, device.clone(), o)?;
            let group = B::across_processes(launch, &file.train.digest_with(&arm.built.spec()), &device, timeout)?;
            let mut trainer = Trainer::new(arm.built, file.train.clone())?;
            trainer.join(DataParallel::new(group));
            if launch.rank != 0 {
                return Ok(session::run(&mut trainer, arm.data.as_ref(), None, &arm.options, &mut ())?);
            }
            let summary = format!("{}; rank 0 of {} ({:?})", arm.summary, launch.world_size, launch.launcher);
            let mut display = RunDisplay::new(o.label, o.output_dir, summary).with_tensorboard(o.tensorboard.clone());
            let validator: Option<&mut dyn Validator<B>> = arm.validator.as_mut().map(|v| v.as_mut() as _);
            Ok(session::run(&mut trainer, arm.data.as_ref(), validator, &arm.options, &mut display)?)
        }
        Plan::Threads(n) => {
            let devices = (0..*n).map(|r| B::rank_device(&device, r)).collect::<Result<Vec<_>>>()?;
            if !B::own_devices() && *n > 1 {
                eprintln!(
                    "note: the {} backend has one device: {n} ranks share it (the data-parallel path, not a speed-up)",
                    B::name()
                );
            }
            let mut arm = prepare_arm(file, start, devices[0].clone(), o)?;
            let weights = HostWeights::of(arm.built.as_ref())?;
            let (spec, parts, seed) = (arm.built.spec(), arm.built.parts(), file.train.seed);
            let mut groups = B::in_process(&devices, timeout)?.into_iter();
            let first = groups.next().context("a run has at least one rank")?;
            let summary = format!("{}; {n} ranks ({}), effective batch x{n}", arm.summary, first.transport());
            let mut trainer = Trainer::new(arm.built, file.train.clone())?;
            trainer.join(DataParallel::new(first));
            let options = &arm.options;
            let results: Vec<Result<RunReport>> = std::thread::scope(|s| {
                let others: Vec<_> = groups
                    .zip(devices.iter().skip(1))
                    .map(|(group, d)| {
                        let (weights, spec, d) = (&weights, &spec, d.clone());
                        s.spawn(move || -> Result<RunReport> {
                            let mut group = group;
                            // Built here, on its own device, from rank 0's values.
                            let setup = || -> Result<_> {
                                let model = weights.replicate::<B>(spec, parts, seed, d)?;
                                let data = file.open_training_set(model.as_ref())?;
                                Ok((Trainer::new(model, file.train.clone())?, data))
                            };
                            let (mut trainer, data) = match setup() {
                                Ok(ready) => ready,
                                Err(e) => {
                                    // The other ranks are told now, not at their timeout.
                                    group.abort(&format!("{e:#}"));
                                    return Err(e);
                                }
                            };
                            trainer.join(DataParallel::new(group));
                            Ok(session::run(&mut trainer, data.as_ref(), None, options, &mut ())?)
                        })
                    })
                    .collect();
                let mut display =
                    RunDisplay::new(o.label, o.output_dir, summary).with_tensorboard(o.tensorboard.clone());
                let validator: Option<&mut dyn Validator<B>> = arm.validator.as_mut().map(|v| v.as_mut() as _);
                let first = session::run(&mut trainer, arm.data.as_ref(), validator, options, &mut display);
                let mut results = vec![first.map_err(anyhow::Error::from)];
                results.extend(
                    others
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a rank's thread panicked")))),
                );
                results
            });
            // The first rank's outcome; a failed rank's own reason before the others' echo of it.
            let mut errors: Vec<String> = Vec::new();
            let mut report = None;
            for (r, result) in results.into_iter().enumerate() {
                match result {
                    Ok(rep) if r == 0 => report = Some(rep),
                    Ok(_) => {}
                    Err(e) => errors.push(format!("rank {r}: {e:#}")),
                }
            }
            match (report, errors.is_empty()) {
                (Some(report), true) => Ok(report),
                _ => bail!("{}", errors.join("; ")),
            }
        }
    }
}
