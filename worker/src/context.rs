//! What every shard run of a worker shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nightshift_storage::{ReadCounter, Stores};

use crate::client::CoordinatorClient;
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
}

impl WorkerMetrics {
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
}
