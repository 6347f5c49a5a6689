//! The processes of a multi-process run meet over TCP: rank 0 listens on `MASTER_ADDR:
//! MASTER_PORT`, every other rank connects and says who it is and what it trains (a digest of
//! its settings), and rank 0 answers all of them at once, with a payload (NCCL's unique id)
//! or with the reason the ranks disagree. The connections stay open: on backends without
//! NCCL they carry the all-reduce ([`TcpRank`], star-shaped through rank 0, summed in rank
//! order); with NCCL they tell each rank when another one is gone ([`Link::watch`]).
//!
//! Every read and connect has a deadline, so a rank that fails or stops answering ends the
//! others with an error that names it, never a hang.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use lisa_core::backend::{Backend, Collective};

use super::host::{reduce_through_host, sum_in_rank_order};
use super::launch::Launch;
use crate::error::{Result, TrainError};

const MAGIC: &[u8; 8] = b"LISADP01";
/// How long rank 0 waits for a new connection to say which rank it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const DATA: u8 = 0;
const ERROR: u8 = 1;
const BYE: u8 = 2;
/// The longest frame a rank accepts (a bucket of gradients is far smaller).
const MAX_FRAME: u64 = 1 << 34;

/// What a rank received: values, the sender's error, its goodbye, or nothing (it is gone).
enum Frame {
    Data(Vec<u8>),
    Error(String),
    Bye,
}

fn write_frame(s: &mut TcpStream, tag: u8, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(body)?;
    s.flush()
}

/// Sends one frame to each of `streams`, best effort: a peer that cannot be written to is
/// found out by its next read.
fn broadcast<'a>(streams: impl IntoIterator<Item = &'a mut TcpStream>, tag: u8, body: &[u8]) {
    for s in streams {
        let _ = write_frame(s, tag, body);
    }
}

/// Reads one frame; `who` names the peer in errors.
/// `timeout` None: wait as long as it takes.
fn read_frame(s: &mut TcpStream, who: &str, timeout: Option<Duration>) -> std::result::Result<Frame, String> {
    let lost = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!(
                "{who} sent nothing for {:.0} s (it is stuck or stopped)",
                timeout.unwrap_or_default().as_secs_f64()
            )
        }
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            format!("{who} closed its connection (it failed or stopped)")
        }
        _ => format!("reading from {who}: {e}"),
    };
    s.set_read_timeout(timeout).map_err(lost)?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(lost)?;
    let len = u64::from_le_bytes(head[1..].try_into().unwrap_or_default());
    if len > MAX_FRAME {
        return Err(format!("{who} sent a frame of {len} bytes: not a lisa rank"));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).map_err(lost)?;
    match head[0] {
        DATA => Ok(Frame::Data(body)),
        ERROR => Ok(Frame::Error(String::from_utf8_lossy(&body).into_owned())),
        BYE => Ok(Frame::Bye),
        t => Err(format!("{who} sent an unknown frame type {t}: not a lisa rank")),
    }
}

/// One process's connections to the others, after the rendezvous: rank 0 holds one per
/// other rank, every other rank one to rank 0.
pub struct Link {
    rank: usize,
    world: usize,
    /// Rank 0: `peers[r]` for `r ≥ 1` (`peers[0]` is None). Others: `peers[0]`, rank 0.
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
}

/// The rendezvous: rank 0 waits up to `timeout` for every other rank of `launch` to connect
/// and checks that all of them train with the same `digest`; then every rank receives rank
/// 0's `payload` (called once, on rank 0, when all have joined). A missing rank, a rank
/// that disagrees or an address that cannot be reached is an error on every rank that
/// can be told.
pub fn rendezvous(
    launch: &Launch,
    digest: &[u8; 32],
    payload: impl FnOnce() -> Result<Vec<u8>>,
    timeout: Duration,
) -> Result<(Link, Vec<u8>)> {
    let fail =
        |m: String| TrainError::Config(format!("rendezvous of rank {} of {}: {m}", launch.rank, launch.world_size));
    let (host, port) = (&launch.master.0, launch.master.1);
    if launch.rank == 0 {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            fail(format!("rank 0 cannot listen on port {port} (MASTER_PORT): {e}; is another run using it?"))
        })?;
        listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..launch.world_size).map(|_| None).collect();
        let mut problems = Vec::new();
        let mut joined = 1;
        while joined < launch.world_size {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| fail(e.to_string()))?;
                    let _ = s.set_nodelay(true);
                    s.set_write_timeout(Some(timeout)).map_err(|e| fail(e.to_string()))?;
                    // A connection that does not introduce itself promptly is not a rank
                    // (a port scanner, a health check): it is dropped, and the wait goes on.
                    match read_hello(&mut s, from, HELLO_TIMEOUT.min(timeout)) {
                        Ok((rank, world, theirs)) => {
                            if world != launch.world_size {
                                problems.push(format!(
                                    "rank {rank} (from {from}) says the run has {world} ranks, rank 0 says {}",
                                    launch.world_size
                                ));
                            } else if theirs != *digest {
                                problems.push(format!(
                                    "rank {rank} (from {from}) trains with other settings, model or data than rank 0 (their digests differ)"
                                ));
                            }
                            if rank == 0 || rank >= launch.world_size || peers[rank].is_some() {
                                let _ = write_frame(
                                    &mut s,
                                    ERROR,
                                    format!("rank {rank} is taken or out of range").as_bytes(),
                                );
                                problems.push(format!("two processes (or an out-of-range one) claim rank {rank}"));
                            } else {
                                peers[rank] = Some(s);
                                joined += 1;
                            }
                        }
                        Err(e) => eprintln!("warning: rendezvous: {e}; ignored"),
                    }
                    if !problems.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> =
                            (1..launch.world_size).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                        problems.push(format!(
                            "rank(s) {} did not join within {:.0} s (started? MASTER_ADDR {host} reachable from them? launched with one process per GPU?)",
                            missing.join(", "),
                            timeout.as_secs_f64()
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(format!("accepting a rank's connection: {e}"))),
            }
        }
        let answer = if problems.is_empty() { payload().map_err(|e| e.to_string()) } else { Err(problems.join("; ")) };
        match &answer {
            Ok(bytes) => broadcast(peers.iter_mut().flatten(), DATA, bytes),
            Err(why) => broadcast(peers.iter_mut().flatten(), ERROR, why.as_bytes()),
        }
        let bytes = answer.map_err(fail)?;
        Ok((Link { rank: 0, world: launch.world_size, peers, timeout }, bytes))
    } else {
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| fail(format!("MASTER_ADDR {host}:{port} does not resolve: {e}")))?
            .collect();
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            let attempt = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok());
            if let Some(s) = attempt {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "rank 0 did not answer at {host}:{port} within {:.0} s (is it started, and the port open?)",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = s.set_nodelay(true);
        s.set_write_timeout(Some(timeout)).map_err(|e| fail(e.to_string()))?;
        let mut hello = Vec::with_capacity(48);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(launch.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(launch.world_size as u32).to_le_bytes());
        hello.extend_from_slice(digest);
        s.write_all(&hello).map_err(|e| fail(format!("sending to rank 0: {e}")))?;
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        match read_frame(&mut s, "rank 0", Some(remaining)).map_err(fail)? {
            Frame::Data(bytes) => {
                Ok((Link { rank: launch.rank, world: launch.world_size, peers: vec![Some(s)], timeout }, bytes))
            }
            Frame::Error(why) => Err(fail(format!("rank 0 refused the run: {why}"))),
            Frame::Bye => Err(fail("rank 0 ended before the run began".into())),
        }
    }
}

/// `(rank, world, digest)` of a connecting rank.
fn read_hello(
    s: &mut TcpStream,
    from: SocketAddr,
    timeout: Duration,
) -> std::result::Result<(usize, usize, [u8; 32]), String> {
    let mut hello = [0u8; 48];
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.read_exact(&mut hello).map_err(|e| format!("a process at {from} connected but did not introduce itself: {e}"))?;
    if &hello[..8] != MAGIC {
        return Err(format!("a process at {from} that is not a lisa rank of this version connected"));
    }
    let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default()) as usize;
    let world = u32::from_le_bytes(hello[12..16].try_into().unwrap_or_default()) as usize;
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&hello[16..]);
    Ok((rank, world, digest))
}

impl Link {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the run.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Says goodbye to the peers: this rank's part of the run ended normally.
    pub fn finish(&mut self) {
        broadcast(self.peers.iter_mut().flatten(), BYE, &[]);
    }

    /// Tells the peers this rank failed, and why.
    pub fn abort(&mut self, why: &str) {
        broadcast(self.peers.iter_mut().flatten(), ERROR, why.as_bytes());
    }

    /// Watches the connections in the background (when the collective runs elsewhere, on
    /// NCCL): `on_lost` is called once, with the reason, when a peer closes its connection
    /// without saying goodbye. This rank's own goodbye goes through the returned handle.
    pub fn watch(self, on_lost: impl Fn(String) + Send + Sync + 'static) -> Result<Watch> {
        let on_lost = std::sync::Arc::new(on_lost);
        let mut writers = Vec::new();
        for (i, s) in self.peers.into_iter().enumerate() {
            let Some(s) = s else { continue };
            let mut reader = s.try_clone().map_err(|e| TrainError::Config(format!("watching rank {i}: {e}")))?;
            writers.push(s);
            let who = if self.rank == 0 { format!("rank {i}") } else { "rank 0".to_string() };
            let on_lost = on_lost.clone();
            std::thread::spawn(move || {
                // No deadline here: a silent peer is caught by the collective's own timeout.
                match read_frame(&mut reader, &who, None) {
                    Ok(Frame::Bye) => {}
                    Ok(Frame::Error(why)) => on_lost(format!("{who} failed: {why}")),
                    Ok(Frame::Data(_)) => on_lost(format!("{who} sent data on the watch connection")),
                    Err(why) => on_lost(why),
                }
            });
        }
        Ok(Watch { writers })
    }
}

/// The write side of a watched [`Link`].
pub struct Watch {
    writers: Vec<TcpStream>,
}

impl Watch {
    /// Tells the peers this rank ended normally.
    pub fn finish(&mut self) {
        broadcast(&mut self.writers, BYE, &[]);
    }

    /// Tells the peers this rank failed, and why.
    pub fn abort(&mut self, why: &str) {
        broadcast(&mut self.writers, ERROR, why.as_bytes());
    }
}

/// A rank whose all-reduce travels over the rendezvous's connections, through host memory:
/// the collective of multi-process runs on the CPU backend (and the tests of launchers).
pub struct TcpRank {
    link: Link,
}

impl TcpRank {
    /// The collective over `link`.
    pub fn new(link: Link) -> Self {
        Self { link }
    }

    /// `Σ_r values_r`, summed in rank order by rank 0 and sent to all.
    pub fn reduce(&mut self, values: Vec<f32>) -> std::result::Result<Vec<f32>, String> {
        let timeout = self.link.timeout;
        if self.link.rank != 0 {
            let s = self.link.peers[0].as_mut().ok_or("no connection to rank 0")?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            write_frame(s, DATA, &bytes).map_err(|e| format!("sending to rank 0: {e} (it failed or stopped)"))?;
            return match read_frame(s, "rank 0", Some(timeout))? {
                Frame::Data(b) => Ok(floats(&b)),
                Frame::Error(why) => Err(why),
                Frame::Bye => Err(
                    "rank 0 finished its run while this rank still reduces (the ranks took different numbers of steps)"
                        .into(),
                ),
            };
        }
        let mut parts = vec![values];
        let mut result = Ok(());
        for r in 1..self.link.world {
            let Some(s) = self.link.peers[r].as_mut() else { continue };
            match read_frame(s, &format!("rank {r}"), Some(timeout)) {
                Ok(Frame::Data(b)) => parts.push(floats(&b)),
                Ok(Frame::Error(why)) => result = Err(format!("rank {r} failed: {why}")),
                Ok(Frame::Bye) => {
                    result = Err(format!(
                        "rank {r} finished its run while rank 0 still reduces (the ranks took different numbers of steps)"
                    ))
                }
                Err(why) => result = Err(why),
            }
            if result.is_err() {
                break;
            }
        }
        let sum = result.and_then(|()| sum_in_rank_order(&parts));
        let message: Vec<u8> = match &sum {
            Ok(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Err(why) => why.as_bytes().to_vec(),
        };
        let tag = if sum.is_ok() { DATA } else { ERROR };
        broadcast(self.link.peers.iter_mut().flatten(), tag, &message);
        sum
    }

    /// Tells the peers this rank ended normally.
    pub fn finish(&mut self) {
        self.link.finish();
    }

    /// Tells the peers this rank failed, and why.
    pub fn abort(&mut self, why: &str) {
        self.link.abort(why);
    }
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl<B: Backend> Collective<B> for TcpRank {
    fn rank(&self) -> usize {
        self.link.rank
    }
    fn world_size(&self) -> usize {
        self.link.world
    }
    fn all_reduce_sum(&mut self, x: &mut B::Tensor) -> lisa_core::Result<()> {
        reduce_through_host::<B>(x, |values| self.reduce(values))
    }
    fn finish(&mut self) {
        TcpRank::finish(self);
    }
    fn abort(&mut self, why: &str) {
        TcpRank::abort(self, why);
    }
    fn transport(&self) -> &'static str {
        "TCP"
    }
}

/// A collective that runs elsewhere (NCCL) with its peers watched over the rendezvous's
/// connections ([`Link::watch`]): its goodbye and its failure reach them there too.
pub struct Watched<C> {
    inner: C,
    watch: Watch,
}

impl<C> Watched<C> {
    /// `inner`, watched through `watch`.
    pub fn new(inner: C, watch: Watch) -> Self {
        Self { inner, watch }
    }
}

impl<B: Backend, C: Collective<B>> Collective<B> for Watched<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, x: &mut B::Tensor) -> lisa_core::Result<()> {
        self.inner.all_reduce_sum(x)
    }
    fn start_all_reduce(&mut self, x: B::Tensor) -> lisa_core::Result<lisa_core::backend::Pending<B::Tensor>> {
        self.inner.start_all_reduce(x)
    }
    fn wait(&mut self, pending: lisa_core::backend::Pending<B::Tensor>) -> lisa_core::Result<B::Tensor> {
        self.inner.wait(pending)
    }
    fn finish(&mut self) {
        self.inner.finish();
        self.watch.finish();
    }
    fn abort(&mut self, why: &str) {
        self.watch.abort(why);
        self.inner.abort(why);
    }
    fn transport(&self) -> &'static str {
        self.inner.transport()
    }
}
