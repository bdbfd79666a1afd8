//! What the dashboard shows beyond a job's status: its shards over the row range, its rows over
//! time, and the workers with the shards they hold.

use std::collections::BTreeMap;

use nightshift_proto::wire::{
    ShardList, ShardView, Throughput, ThroughputPoint, WorkerLease, WorkerList, WorkerView,
};

use crate::api_error::ApiError;
use crate::service::Service;

/// Buckets a throughput answer aims at over the job's run.
const THROUGHPUT_POINTS: i64 = 60;
/// The shortest throughput bucket.
const MIN_BUCKET_MS: i64 = 1_000;
/// A worker's rows/s is measured over this window, and a worker that claimed within it is shown.
const WORKER_WINDOW_MS: i64 = 60_000;
const MS_PER_S: f64 = 1_000.0;

impl Service {
    /// A job's shards in row order, each with its place in the job's rows.
    pub async fn shard_list(&self, id_or_name: &str) -> Result<ShardList, ApiError> {
        let job = self.find(id_or_name).await?;
        let mut row_start = 0;
        let shards = self
            .store
            .shards(job.id)
            .await?
            .into_iter()
            .map(|s| {
                let view = ShardView {
                    id: s.id,
                    row_start,
                    rows: s.rows,
                    state: s.state,
                    attempts: s.attempts,
                    rows_done: s.checkpoint_rows,
                    error_rows: s.error_rows,
                    worker: s.worker_id,
                    error: s.error,
                };
                row_start += s.rows;
                view
            })
            .collect();
        Ok(ShardList { shards })
    }

    /// Rows a job committed over its run, in about `THROUGHPUT_POINTS` buckets of whole seconds.
    pub async fn throughput(&self, id_or_name: &str) -> Result<Throughput, ApiError> {
        let job = self.find(id_or_name).await?;
        let now = self.store.now_ms().await?;
        let from = job.started_at_ms.unwrap_or(job.created_at_ms);
        let span = job.finished_at_ms.unwrap_or(now).saturating_sub(from);
        let at_least = (span / THROUGHPUT_POINTS).max(MIN_BUCKET_MS).unsigned_abs();
        let seconds = at_least.div_ceil(MIN_BUCKET_MS.unsigned_abs());
        let bucket_ms = i64::try_from(seconds).unwrap_or(i64::MAX / MIN_BUCKET_MS) * MIN_BUCKET_MS;
        let points = self
            .store
            .rows_over_time(job.id, bucket_ms)
            .await?
            .into_iter()
            .map(|p| ThroughputPoint {
                at_ms: p.at_ms,
                rows: p.rows,
            })
            .collect();
        Ok(Throughput {
            bucket_ms: bucket_ms.unsigned_abs(),
            points,
        })
    }

    /// Workers that claimed within the window or hold a lease: their shards from the
    /// metastore, their GPUs from their last heartbeat to this coordinator, their slots from it
    /// or else from their last claim (an idle worker sends no heartbeat).
    pub async fn workers(&self) -> Result<WorkerList, ApiError> {
        let seen = self.store.workers_seen(WORKER_WINDOW_MS).await?;
        let mut leases: BTreeMap<String, Vec<WorkerLease>> = BTreeMap::new();
        // A worker busy on all its slots claims nothing for a while, but its heartbeats keep
        // moving its leases' expiry on: the latest renewal is when it was last heard from.
        let mut renewed: BTreeMap<String, i64> = BTreeMap::new();
        for s in self.store.leased_shards().await? {
            if let Some(expires) = s.lease_expires_at_ms {
                let at = renewed.entry(s.worker_id.clone()).or_insert(i64::MIN);
                *at = (*at).max(expires - self.timing.ttl_ms);
            }
            leases.entry(s.worker_id).or_default().push(WorkerLease {
                job_id: s.job_id,
                shard_id: s.shard_id,
                rows: s.rows,
                rows_done: s.checkpoint_rows,
            });
        }
        let mut reports = self.metrics.worker_reports();
        let window_s = WORKER_WINDOW_MS as f64 / MS_PER_S;
        let workers = seen
            .into_iter()
            .map(|w| {
                let report = reports.remove(&w.id).unwrap_or_default();
                WorkerView {
                    leases: leases.remove(&w.id).unwrap_or_default(),
                    rows_per_s: w.rows_recent as f64 / window_s,
                    slots: report
                        .slots
                        .or_else(|| w.slots.and_then(|n| u32::try_from(n).ok())),
                    gpus: report.gpus,
                    last_seen_ms: w
                        .last_seen_ms
                        .max(renewed.remove(&w.id).unwrap_or(i64::MIN)),
                    instance: instance_of(&w),
                    draining: w.draining,
                    drain_told: w.drain_told,
                    id: w.id,
                }
            })
            .collect();
        Ok(WorkerList { workers })
    }
}

/// The machine a worker said it runs on: all of id, type and capacity type, or none.
fn instance_of(w: &nightshift_metastore::WorkerSeen) -> Option<nightshift_proto::InstanceInfo> {
    Some(nightshift_proto::InstanceInfo {
        id: w.instance_id.clone()?,
        instance_type: w.instance_type.clone()?,
        capacity_type: nightshift_proto::CapacityType::parse(w.capacity_type.as_deref()?)?,
    })
}
