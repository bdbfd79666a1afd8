//! The worker's lease loop: a fixed number of slots pull shards from the coordinator, a
//! separate task renews every held lease (so a busy worker is never taken for a dead one), and
//! shutdown drains: no new shards, the batches in flight are finished, checkpointed and
//! released within the drain deadline.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightshift_proto::InstanceInfo;
use nightshift_proto::LeaseState;
use nightshift_proto::wire::{LeaseRef, LeaseRequest, LoadedModel, ShardLease};
use nightshift_storage::{ReadCounter, Stores};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::{ClientError, CoordinatorClient};
use crate::context::{WorkerContext, WorkerMetrics, WorkerReport};
use crate::executor::{DEFAULT_MODEL_CACHE, Executor, SessionOptions};
use crate::gpus::GpuMonitor;
use crate::model_files::ModelFiles;
use crate::onnx_runtime::{self, RuntimeError};
use crate::pipeline::{InputDone, ShardOutcome, ShardSignals, run_shard};

const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
const DEFAULT_IDLE_POLL: Duration = Duration::from_millis(500);
/// The lease TTL assumed until the coordinator's first answer gives it.
const ASSUMED_LEASE_TTL: Duration = Duration::from_secs(30);
/// A TTL the coordinator gives is taken as at least this (heartbeats stay sane).
const MIN_LEASE_TTL: Duration = Duration::from_millis(300);
/// With no work, lease requests back off doubling up to this many idle polls apart.
const MAX_IDLE_BACKOFF: u32 = 4;
/// With every slot busy, the loop waits for a shard to end or read all its input (a wake-up),
/// at most this long.
const BUSY_WAIT: Duration = Duration::from_secs(3600);
/// Heartbeats per lease TTL, and the longest gap between two (so a cancelled job's shards
/// stop within a couple of batches).
const HEARTBEATS_PER_TTL: u32 = 3;
const MAX_HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Why a worker stopped on its own rather than when asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the inference threads: {0}")]
    Threads(std::io::Error),
    #[error("the coordinator refuses this worker, so it stopped ({0}); fix its token or flags")]
    Refused(ClientError),
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub coordinator: String,
    pub token: String,
    pub worker_id: String,
    /// Shards run at once.
    pub slots: usize,
    /// The CUDA devices this worker's slots use, slot `i` on `gpus[i % len]` (empty: none,
    /// `auto` models run on the CPU).
    pub gpus: Vec<u32>,
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per session (0: its default).
    pub intra_threads: usize,
    /// Model sessions each slot keeps loaded across shards and jobs.
    pub model_cache: usize,
    /// Where remote models are cached by ETag.
    pub cache_dir: PathBuf,
    /// Time allowed to finish, checkpoint and release after a shutdown signal.
    pub drain_timeout: Duration,
    /// Wait between lease requests when there is no work.
    pub idle_poll: Duration,
    /// The machine this worker runs on, told to the coordinator with each claim (for the
    /// fleet scaler and jobs' costs).
    pub instance: Option<InstanceInfo>,
}

impl WorkerConfig {
    pub fn new(coordinator: &str, token: &str) -> Self {
        Self {
            coordinator: coordinator.to_string(),
            token: token.to_string(),
            worker_id: default_worker_id(),
            slots: 1,
            gpus: Vec::new(),
            ort_lib: None,
            intra_threads: 0,
            model_cache: DEFAULT_MODEL_CACHE,
            cache_dir: std::env::temp_dir().join("nightshift-models"),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            idle_poll: DEFAULT_IDLE_POLL,
            instance: None,
        }
    }
}

/// Tensor preparation threads per shard: the machine's cores shared among the slots.
fn prepare_threads(slots: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / slots).max(1)
}

/// `host-pid-random`: unique per process.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

pub struct Worker {
    ctx: Arc<WorkerContext>,
    slots: usize,
    gpus: Vec<u32>,
    model_cache: usize,
    drain_timeout: Duration,
    idle_poll: Duration,
    instance: Option<InstanceInfo>,
}

type Held = Arc<Mutex<HashMap<LeaseRef, ShardSignals>>>;

impl Worker {
    /// Loads ONNX Runtime (failing here, before any lease, when it is missing).
    pub fn build(config: WorkerConfig, stores: Arc<Stores>) -> Result<Self, RuntimeError> {
        let runtime = onnx_runtime::load(config.ort_lib.as_deref())?;
        let ctx = WorkerContext {
            worker_id: config.worker_id.clone(),
            stores,
            client: CoordinatorClient::new(&config.coordinator, &config.token)
                .for_worker(&config.worker_id),
            runtime,
            models: ModelFiles::new(config.cache_dir.clone()),
            read_counter: ReadCounter::default(),
            intra_threads: config.intra_threads,
            prepare_threads: prepare_threads(config.slots.max(1)),
            metrics: WorkerMetrics::default(),
        };
        Ok(Self {
            ctx: Arc::new(ctx),
            slots: config.slots.max(1),
            gpus: config.gpus,
            model_cache: config.model_cache,
            drain_timeout: config.drain_timeout,
            idle_poll: config.idle_poll,
            instance: config.instance,
        })
    }

    pub fn report(&self) -> WorkerReport {
        self.ctx.metrics.snapshot()
    }

    pub fn read_counter(&self) -> ReadCounter {
        self.ctx.read_counter.clone()
    }

    pub fn metrics_handle(&self) -> Arc<WorkerContext> {
        self.ctx.clone()
    }

    /// Runs until `shutdown` (or a drain the coordinator asks), then drains. A worker the
    /// coordinator refuses (`ClientError::refuses_worker`) drains and stops with that error
    /// rather than claiming in vain for ever.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport, WorkerError> {
        let ctx = self.ctx.clone();
        let held: Held = Arc::new(Mutex::new(HashMap::new()));
        let ttl = Arc::new(Mutex::new(ASSUMED_LEASE_TTL));
        let mut slots = self.start_slots().map_err(WorkerError::Threads)?;
        let executors: Vec<Arc<Executor>> = slots.iter().map(|s| s.executor.clone()).collect();
        let heartbeat_stop = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(
            ctx.clone(),
            self.gpus.clone(),
            executors.clone(),
            held.clone(),
            ttl.clone(),
            heartbeat_stop.clone(),
            shutdown.clone(),
        ));
        let mut running: JoinSet<()> = JoinSet::new();
        let mut slot_of: HashMap<tokio::task::Id, usize> = HashMap::new();
        let input_read = Arc::new(Notify::new());
        tracing::info!(worker = %ctx.worker_id, slots = self.slots, gpus = ?self.gpus, "worker started");
        let mut idle = self.idle_poll;
        let mut refused = None;
        while !shutdown.is_cancelled() {
            let ready = ready_slots(&slots);
            let mut granted = 0;
            if !ready.is_empty() {
                match ctx
                    .client
                    .lease_with(&self.lease_request(ready.len()))
                    .await
                {
                    Ok(resp) if resp.drain => {
                        tracing::info!("the coordinator asked this worker to drain");
                        shutdown.cancel();
                    }
                    Ok(resp) => {
                        *lock(&ttl) = Duration::from_millis(resp.lease_ttl_ms).max(MIN_LEASE_TTL);
                        granted = resp.leases.len();
                        for (lease, &i) in resp.leases.into_iter().zip(&ready) {
                            let done = Arc::new(InputDone::new(input_read.clone()));
                            let executor = slots[i].executor.clone();
                            let id = self.spawn_shard(
                                &mut running,
                                &held,
                                &shutdown,
                                lease,
                                executor,
                                done.clone(),
                            );
                            if !slots[i].shards.is_empty() {
                                ctx.metrics
                                    .shards_read_ahead
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            slots[i].shards.push((id, done));
                            slot_of.insert(id, i);
                        }
                    }
                    Err(e) if e.refuses_worker() => {
                        tracing::error!(error = %e, "the coordinator refuses this worker: stopping");
                        refused = Some(e);
                        shutdown.cancel();
                    }
                    Err(e) => tracing::warn!(error = %e, "lease request failed"),
                }
            }
            let wait = if granted > 0 {
                idle = self.idle_poll;
                None
            } else if running.len() < self.slots {
                let w = idle;
                idle = (idle * 2).min(self.idle_poll * MAX_IDLE_BACKOFF);
                Some(w)
            } else {
                Some(BUSY_WAIT)
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                        shard_ended(done, &mut slot_of, &mut slots);
                        idle = self.idle_poll;
                    }
                    _ = input_read.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            while let Some(done) = running.try_join_next_with_id() {
                shard_ended(done, &mut slot_of, &mut slots);
            }
        }
        self.drain(&mut running, &held).await;
        heartbeat_stop.cancel();
        let _ = heartbeats.await;
        let _ = tokio::task::spawn_blocking(move || executors.iter().for_each(|e| e.stop())).await;
        let report = ctx.metrics.snapshot();
        tracing::info!(?report, "worker stopped");
        match refused {
            Some(e) => Err(WorkerError::Refused(e)),
            None => Ok(report),
        }
    }

    /// A claim of `max` shards, saying what this worker runs on.
    fn lease_request(&self, max: usize) -> LeaseRequest {
        LeaseRequest {
            worker_id: self.ctx.worker_id.clone(),
            max: max as u32,
            instance: self.instance.clone(),
            slots: u32::try_from(self.slots).ok(),
            gpus: u32::try_from(self.gpus.iter().collect::<BTreeSet<_>>().len()).ok(),
        }
    }

    fn start_slots(&self) -> std::io::Result<Vec<SlotState>> {
        let options = SessionOptions {
            runtime: self.ctx.runtime,
            intra_threads: self.ctx.intra_threads,
            capacity: self.model_cache,
        };
        (0..self.slots)
            .map(|i| {
                let gpu = (!self.gpus.is_empty()).then(|| self.gpus[i % self.gpus.len()]);
                Ok(SlotState {
                    executor: Arc::new(Executor::start(i, gpu, options)?),
                    shards: Vec::new(),
                })
            })
            .collect()
    }

    /// Drain: every shard finishes its batches in flight, checkpoints and releases.
    async fn drain(&self, running: &mut JoinSet<()>, held: &Held) {
        let in_flight = running.len();
        if in_flight > 0 {
            tracing::info!(
                shards = in_flight,
                timeout_s = self.drain_timeout.as_secs_f64(),
                "draining"
            );
        }
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let left: Vec<i64> = lock(held).keys().map(|l| l.shard_id).collect();
            tracing::error!(shards = ?left, "drain deadline passed; abandoning shards (their leases will expire)");
            for s in lock(held).values() {
                s.abort.cancel();
            }
            running.shutdown().await;
        }
    }

    fn spawn_shard(
        &self,
        running: &mut JoinSet<()>,
        held: &Held,
        shutdown: &CancellationToken,
        lease: ShardLease,
        executor: Arc<Executor>,
        input_done: Arc<InputDone>,
    ) -> tokio::task::Id {
        let ctx = self.ctx.clone();
        let lease_ref = lease.lease_ref();
        let signals = ShardSignals {
            drain: shutdown.child_token(),
            abort: CancellationToken::new(),
        };
        lock(held).insert(lease_ref, signals.clone());
        let held = held.clone();
        let span = tracing::info_span!(
            "shard",
            job = lease.job_id,
            shard = lease.shard_id,
            attempt = lease.attempt
        );
        let handle = running.spawn(async move {
            let kind = if lease.merge.is_some() { "merge" } else { "rows" };
            tracing::info!(job = lease.job_id, shard = lease.shard_id, kind, attempt = lease.attempt, from_row = lease.checkpoint_rows, rows = lease.plan.rows, "shard leased");
            let outcome = run_shard(&ctx, &lease, &executor, &signals, &input_done).await;
            lock(&held).remove(&lease_ref);
            let m = &ctx.metrics;
            let inc = |a: &std::sync::atomic::AtomicU64| {
                a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            match outcome {
                ShardOutcome::Completed { rows } => {
                    inc(&m.shards_completed);
                    tracing::info!(shard = lease.shard_id, rows, "shard completed");
                }
                ShardOutcome::Released { committed } => {
                    inc(&m.shards_released);
                    tracing::info!(shard = lease.shard_id, committed, "shard released");
                }
                ShardOutcome::Lost => {
                    inc(&m.shards_lost);
                    tracing::warn!(shard = lease.shard_id, "lease lost; shard abandoned");
                }
                ShardOutcome::Failed(e) => {
                    inc(&m.shards_failed);
                    let class = e.class();
                    tracing::error!(shard = lease.shard_id, %class, error = %e, "shard failed");
                    let taken_by = e.taken_by().map(str::to_string);
                    if let Err(re) = ctx.client.fail_taken(lease_ref, class, e.to_string(), taken_by).await {
                        tracing::warn!(shard = lease.shard_id, error = %re, "reporting the failure failed");
                    }
                }
            }
        }.instrument(span));
        handle.id()
    }
}

/// A slot: its executor and the shards feeding it, oldest first.
struct SlotState {
    executor: Arc<Executor>,
    shards: Vec<(tokio::task::Id, Arc<InputDone>)>,
}

/// Most shards a slot holds at once: one being inferred and the next one reading ahead.
const SHARDS_PER_SLOT: usize = 2;

/// Slots that can take a shard now: idle ones first, then those whose every shard has read
/// all its input (the new shard's reading overlaps their last batches).
fn ready_slots(slots: &[SlotState]) -> Vec<usize> {
    let idle = (0..slots.len()).filter(|&i| slots[i].shards.is_empty());
    let tail = (0..slots.len()).filter(|&i| {
        let shards = &slots[i].shards;
        !shards.is_empty()
            && shards.len() < SHARDS_PER_SLOT
            && shards.iter().all(|(_, done)| done.is_done())
    });
    idle.chain(tail).collect()
}

/// Forgets a shard task that ended (or panicked) on its slot.
fn shard_ended(
    done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    slot_of: &mut HashMap<tokio::task::Id, usize>,
    slots: &mut [SlotState],
) {
    let id = match done {
        Ok((id, ())) => id,
        Err(e) => {
            tracing::error!(error = %e, "a shard task panicked");
            e.id()
        }
    };
    if let Some(i) = slot_of.remove(&id) {
        slots[i].shards.retain(|(task, _)| *task != id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renews every held lease (every third of the TTL, at most 2 s); a lost or cancelled lease
/// aborts its shard. An answer asking this worker to drain cancels `drain`.
async fn heartbeat_loop(
    ctx: Arc<WorkerContext>,
    gpus: Vec<u32>,
    executors: Vec<Arc<Executor>>,
    held: Held,
    ttl: Arc<Mutex<Duration>>,
    stop: CancellationToken,
    drain: CancellationToken,
) {
    let client = ctx.client.clone().with_retry_times(2);
    let monitor = GpuMonitor::new();
    // One executor per slot.
    let slots = u32::try_from(executors.len()).ok();
    loop {
        let every = (*lock(&ttl) / HEARTBEATS_PER_TTL).min(MAX_HEARTBEAT_EVERY);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leases: Vec<LeaseRef> = lock(&held).keys().copied().collect();
        if leases.is_empty() {
            continue;
        }
        let samples = monitor.sample(&gpus);
        let models: BTreeSet<LoadedModel> = executors.iter().flat_map(|e| e.loaded()).collect();
        let models = models.into_iter().collect();
        match client
            .heartbeat(&ctx.worker_id, leases, samples, models, slots)
            .await
        {
            Ok(resp) => {
                if resp.drain && !drain.is_cancelled() {
                    tracing::info!("the coordinator asked this worker to drain");
                    drain.cancel();
                }
                for status in resp.leases {
                    if status.state == LeaseState::Held {
                        continue;
                    }
                    let mut held = lock(&held);
                    let key = held
                        .keys()
                        .find(|l| l.shard_id == status.shard_id && l.token == status.token)
                        .copied();
                    if let Some(signals) = key.and_then(|k| held.remove(&k)) {
                        tracing::warn!(shard = status.shard_id, state = %status.state, "lease no longer held; stopping shard");
                        signals.abort.cancel();
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}
