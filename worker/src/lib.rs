//! The worker: leases shards from a coordinator and runs them through the inference pipeline
//! (ranged Parquet reads -> tensors -> ONNX Runtime on dedicated threads -> Parquet parts ->
//! checkpoints), heartbeating on a task of its own and draining cleanly on shutdown.

pub mod allocator;
pub mod client;
pub mod context;
mod executor;
pub mod gpus;
pub mod model_files;
pub mod model_session;
pub mod onnx_runtime;
mod pipeline;
pub mod scheduling;
mod shard_error;
pub mod spot;
mod tensors;
pub mod text;
mod worker;

pub use context::WorkerReport;
pub use executor::DEFAULT_MODEL_CACHE;
pub use worker::{Worker, WorkerConfig, WorkerError};
