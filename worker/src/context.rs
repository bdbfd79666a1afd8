//! What every shard run of a worker shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nightshift_storage::{ReadCounter, Stores};

use crate::client::CoordinatorClient;
use crate::executor::StreamReport;
use crate::model_files::ModelFiles;
use crate::onnx_runtime::OnnxRuntime;

pub struct WorkerContext {
    pub worker_id: String,
    pub stores: Arc<Stores>,
    pub client: CoordinatorClient,
    pub runtime: &'static OnnxRuntime,
    pub models: ModelFiles,
    pub read_counter: ReadCounter,
    /// ONNX Runtime intra-op threads per session (0: its default).
    pub intra_threads: usize,
    /// Blocking threads that prepare one shard's tensors at once.
    pub prepare_threads: usize,
    pub metrics: WorkerMetrics,
}

/// Counters recorded per batch.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    pub rows: AtomicU64,
    pub batches: AtomicU64,
    pub error_rows: AtomicU64,
    pub shards_completed: AtomicU64,
    pub shards_released: AtomicU64,
    pub shards_failed: AtomicU64,
    pub shards_lost: AtomicU64,
    pub model_calls: AtomicU64,
    /// The most rows one model call carried.
    pub largest_model_call: AtomicU64,
    /// Model sessions opened (not found loaded in the slot's cache).
    pub model_loads: AtomicU64,
    /// Shards started on a slot while its previous shard was still running.
    pub shards_read_ahead: AtomicU64,
}

impl WorkerMetrics {
    /// Adds what the executor did for one shard.
    pub fn record_stream(&self, report: StreamReport) {
        let stats = report.calls;
        self.model_calls.fetch_add(stats.calls, Ordering::Relaxed);
        self.largest_model_call
            .fetch_max(stats.largest as u64, Ordering::Relaxed);
        self.model_loads
            .fetch_add(u64::from(report.opened), Ordering::Relaxed);
    }

    pub fn record_batch(&self, rows: usize, errors: usize) {
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.error_rows.fetch_add(errors as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> WorkerReport {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerReport {
            rows: g(&self.rows),
            batches: g(&self.batches),
            error_rows: g(&self.error_rows),
            shards_completed: g(&self.shards_completed),
            shards_released: g(&self.shards_released),
            shards_failed: g(&self.shards_failed),
            shards_lost: g(&self.shards_lost),
            model_calls: g(&self.model_calls),
            largest_model_call: g(&self.largest_model_call),
            model_loads: g(&self.model_loads),
            shards_read_ahead: g(&self.shards_read_ahead),
        }
    }
}

/// What a worker did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerReport {
    /// Input rows run through the model (rows recomputed after a failure count again).
    pub rows: u64,
    pub batches: u64,
    pub error_rows: u64,
    pub shards_completed: u64,
    pub shards_released: u64,
    pub shards_failed: u64,
    pub shards_lost: u64,
    pub model_calls: u64,
    pub largest_model_call: u64,
    pub model_loads: u64,
    pub shards_read_ahead: u64,
}
