//! `nightshift-bench`: throughput measured as ratios against a baseline run in the same
//! process, never as pass/fail timings.
//!
//!   cargo run --release -p nightshift-bench -- pipeline     # worker pipeline vs bare ONNX Runtime
//!   cargo run --release -p nightshift-bench -- lease        # lease layer: claims+completes/s

mod lease;
mod pipeline;
mod storage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nightshift-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Worker pipeline rows/s over a bare ONNX Runtime loop on the same rows, same model,
    /// same batch size.
    Pipeline(pipeline::Args),
    /// Shard claims+completes per second and claim latency at 1, 16 and 64 workers, on the
    /// PostgreSQL store directly and through the coordinator's HTTP API.
    Lease(lease::Args),
    /// Object storage against a local S3 server: bytes fetched per byte a Parquet read needs,
    /// and PartUpload throughput over one plain put.
    Storage(storage::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    nightshift_worker::allocator::tune();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Pipeline(a) => pipeline::run(a).await,
            Command::Lease(a) => lease::run(a).await,
            Command::Storage(a) => storage::run(a).await,
        }
    })
}
