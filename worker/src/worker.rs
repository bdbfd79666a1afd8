//! The worker's lease loop: a fixed number of slots pull shards from the coordinator, a
//! separate task renews every held lease (so a busy worker is never taken for a dead one), and
//! shutdown drains: no new shards, the batches in flight are finished, checkpointed and
//! released within the drain deadline.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightshift_proto::LeaseState;
use nightshift_proto::wire::{LeaseRef, ShardLease};
use nightshift_storage::{ReadCounter, Stores};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::CoordinatorClient;
use crate::context::{WorkerContext, WorkerMetrics, WorkerReport};
use crate::gpus::GpuMonitor;
use crate::model_files::ModelFiles;
use crate::onnx_runtime::{self, RuntimeError};
use crate::pipeline::{ShardOutcome, ShardSignals, Slot, run_shard};

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
    /// Where remote models are cached by ETag.
    pub cache_dir: PathBuf,
    /// Time allowed to finish, checkpoint and release after a shutdown signal.
    pub drain_timeout: Duration,
    /// Wait between lease requests when there is no work.
    pub idle_poll: Duration,
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
            cache_dir: std::env::temp_dir().join("nightshift-models"),
            drain_timeout: Duration::from_secs(90),
            idle_poll: Duration::from_millis(500),
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
    drain_timeout: Duration,
    idle_poll: Duration,
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
            drain_timeout: config.drain_timeout,
            idle_poll: config.idle_poll,
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

    /// Runs until `shutdown`, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> WorkerReport {
        let ctx = self.ctx.clone();
        let held: Held = Arc::new(Mutex::new(HashMap::new()));
        let ttl = Arc::new(Mutex::new(Duration::from_secs(30)));
        let heartbeat_stop = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(
            ctx.clone(),
            self.gpus.clone(),
            held.clone(),
            ttl.clone(),
            heartbeat_stop.clone(),
        ));
        let mut running: JoinSet<Slot> = JoinSet::new();
        // Free slots; a running shard's slot comes back when it ends, even if it panicked.
        let mut idle_slots: Vec<Slot> = (0..self.slots)
            .rev()
            .map(|i| Slot {
                gpu: (!self.gpus.is_empty()).then(|| self.gpus[i % self.gpus.len()]),
                model: None,
            })
            .collect();
        let mut gpu_of: HashMap<tokio::task::Id, Option<u32>> = HashMap::new();
        tracing::info!(worker = %ctx.worker_id, slots = self.slots, gpus = ?self.gpus, "worker started");
        let mut idle = self.idle_poll;
        while !shutdown.is_cancelled() {
            let free = self.slots - running.len();
            let mut granted = 0;
            if free > 0 {
                match ctx.client.lease(&ctx.worker_id, free as u32).await {
                    Ok(resp) => {
                        *lock(&ttl) = Duration::from_millis(resp.lease_ttl_ms.max(300));
                        granted = resp.leases.len();
                        for lease in resp.leases {
                            let Some(slot) = idle_slots.pop() else { break };
                            let gpu = slot.gpu;
                            let id = self.spawn_shard(&mut running, &held, &shutdown, lease, slot);
                            gpu_of.insert(id, gpu);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "lease request failed"),
                }
            }
            let wait = if granted > 0 {
                idle = self.idle_poll;
                None
            } else if running.len() < self.slots {
                let w = idle;
                idle = (idle * 2).min(self.idle_poll * 4);
                Some(w)
            } else {
                Some(Duration::from_secs(3600))
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                        slot_back(done, &mut gpu_of, &mut idle_slots);
                        idle = self.idle_poll;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            while let Some(done) = running.try_join_next_with_id() {
                slot_back(done, &mut gpu_of, &mut idle_slots);
            }
        }
        // Drain: every shard finishes its batches in flight, checkpoints and releases.
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
            let left: Vec<i64> = lock(&held).keys().map(|l| l.shard_id).collect();
            tracing::error!(shards = ?left, "drain deadline passed; abandoning shards (their leases will expire)");
            for s in lock(&held).values() {
                s.abort.cancel();
            }
            running.shutdown().await;
        }
        heartbeat_stop.cancel();
        let _ = heartbeats.await;
        let report = ctx.metrics.snapshot();
        tracing::info!(?report, "worker stopped");
        report
    }

    fn spawn_shard(
        &self,
        running: &mut JoinSet<Slot>,
        held: &Held,
        shutdown: &CancellationToken,
        lease: ShardLease,
        mut slot: Slot,
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
            tracing::info!(job = lease.job_id, shard = lease.shard_id, attempt = lease.attempt, from_row = lease.checkpoint_rows, rows = lease.plan.rows, "shard leased");
            let outcome = run_shard(&ctx, &lease, &mut slot, &signals).await;
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
                    if let Err(re) = ctx.client.fail(lease_ref, class, e.to_string()).await {
                        tracing::warn!(shard = lease.shard_id, error = %re, "reporting the failure failed");
                    }
                }
            }
            slot
        }.instrument(span));
        handle.id()
    }
}

/// Puts the slot of a shard task that ended back among the idle ones; the slot of a task that
/// panicked comes back empty, on its GPU.
fn slot_back(
    done: Result<(tokio::task::Id, Slot), tokio::task::JoinError>,
    gpu_of: &mut HashMap<tokio::task::Id, Option<u32>>,
    idle: &mut Vec<Slot>,
) {
    idle.push(match done {
        Ok((id, slot)) => {
            gpu_of.remove(&id);
            slot
        }
        Err(e) => Slot {
            gpu: gpu_of.remove(&e.id()).flatten(),
            model: None,
        },
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renews every held lease (every third of the TTL, at most 2 s); a lost or cancelled lease
/// aborts its shard.
async fn heartbeat_loop(
    ctx: Arc<WorkerContext>,
    gpus: Vec<u32>,
    held: Held,
    ttl: Arc<Mutex<Duration>>,
    stop: CancellationToken,
) {
    let client = ctx.client.clone().with_retry_times(2);
    let monitor = GpuMonitor::new();
    loop {
        // A third of the TTL keeps leases alive; at most 2 s so a cancelled job's shards stop
        // within a couple of batches.
        let every = (*lock(&ttl) / 3).min(Duration::from_secs(2));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leases: Vec<LeaseRef> = lock(&held).keys().copied().collect();
        if leases.is_empty() {
            continue;
        }
        let samples = monitor.sample(&gpus);
        match client.heartbeat(&ctx.worker_id, leases, samples).await {
            Ok(resp) => {
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
