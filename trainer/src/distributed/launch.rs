//! Where this process stands in a multi-process run, read from the variables that users'
//! launchers set: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) or srun's (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, with
//! `MASTER_ADDR` exported by the job script). Every variable is checked before any GPU work.

use crate::error::{Result, TrainError};

/// The port rank 0 listens on when srun launched the run and `MASTER_PORT` is unset (torch's
/// default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The most ranks a run may have.
pub const MAX_WORLD: usize = 1 << 16;

/// Which launcher's variables described the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything that sets its variables: `accelerate launch`, `mpirun -x`).
    Torchrun,
    /// `srun`: one task per GPU.
    Slurm,
}

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank, `0 ≤ rank < world_size`.
    pub rank: usize,
    /// Processes in the run.
    pub world_size: usize,
    /// This process's index on its machine: the GPU it trains on.
    pub local_rank: usize,
    /// Where rank 0 listens for the others: `(MASTER_ADDR, port)`, the port `MASTER_PORT`, or
    /// `MASTER_PORT + 1` under torchrun (whose agent serves its own store on `MASTER_PORT`),
    /// or `LISA_MASTER_PORT` when set.
    pub master: (String, u16),
    /// Whose variables these were.
    pub launcher: Launcher,
}

impl Launch {
    /// The run this process belongs to, from the environment: None when no launcher's
    /// variables are set, or when they describe a run of one process.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let bad = |name: &str, reason: String| TrainError::Config(format!("the launcher's variable {name}: {reason}"));
        let number = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| bad(name, format!("{v:?} is not a non-negative integer"))),
            }
        };
        let torchrun = ["RANK", "WORLD_SIZE", "LOCAL_RANK"].iter().any(|k| var(k).is_some());
        // Only srun's steps: a job's batch script sees SLURM_PROCID and SLURM_NTASKS too, but
        // it is one process.
        let slurm = var("SLURM_PROCID").is_some() && var("SLURM_STEP_NUM_TASKS").is_some();
        let (launcher, names) = if torchrun {
            (Launcher::Torchrun, ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
        } else if slurm {
            (Launcher::Slurm, ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"])
        } else {
            return Ok(None);
        };
        let [rank_var, world_var, local_var] = names;
        let missing = |name: &str| {
            bad(name, format!("is not set, but {} are: set all three, as {launcher:?} does", names.join(", ")))
        };
        let world = number(world_var)?.ok_or_else(|| missing(world_var))?;
        let rank = number(rank_var)?.ok_or_else(|| missing(rank_var))?;
        if !(1..=MAX_WORLD).contains(&world) {
            return Err(bad(world_var, format!("must lie in 1..={MAX_WORLD}, got {world}")));
        }
        if rank >= world {
            return Err(bad(rank_var, format!("is {rank}, but {world_var} is {world}: ranks are 0..{world}")));
        }
        if world == 1 {
            return Ok(None);
        }
        let local = number(local_var)?.ok_or_else(|| missing(local_var))?;
        if local > rank {
            return Err(bad(local_var, format!("is {local}, more than the global rank {rank}")));
        }
        let addr = var("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| match launcher {
            Launcher::Torchrun => bad("MASTER_ADDR", "is not set: rank 0's host name or address (torchrun sets it)".into()),
            Launcher::Slurm => bad(
                "MASTER_ADDR",
                "is not set: export it in the job script, e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)".into(),
            ),
        })?;
        let port = match (var("MASTER_PORT"), launcher) {
            (Some(p), _) => match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(bad("MASTER_PORT", format!("{p:?} is not a port number (1..=65535)"))),
            },
            (None, Launcher::Slurm) => DEFAULT_MASTER_PORT,
            (None, Launcher::Torchrun) => {
                return Err(bad("MASTER_PORT", "is not set: the port rank 0 listens on (torchrun sets it)".into()));
            }
        };
        // torchrun's agent serves its own store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE):
        // lisa's rendezvous takes the next port, or LISA_MASTER_PORT when given.
        let port = match var("LISA_MASTER_PORT") {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(bad("LISA_MASTER_PORT", format!("{p:?} is not a port number (1..=65535)"))),
            },
            None if var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")) => {
                port.checked_add(1).ok_or_else(|| {
                    bad(
                        "MASTER_PORT",
                        "is 65535: lisa listens on MASTER_PORT + 1 under torchrun; set LISA_MASTER_PORT".into(),
                    )
                })?
            }
            None => port,
        };
        Ok(Some(Self { rank, world_size: world, local_rank: local, master: (addr.trim().to_string(), port), launcher }))
    }
}
