//! `nightshift-bench`: throughput measured as ratios against a baseline run in the same
//! process, never as pass/fail timings.
//!
//!   cargo run --release -p nightshift-bench -- pipeline     # worker pipeline vs bare ONNX Runtime
//!   cargo run --release -p nightshift-bench -- lease        # lease layer: claims+completes/s
//!   cargo run --release -p nightshift-bench -- load         # 1,000 simulated workers on one coordinator
//!   cargo run --release -p nightshift-bench -- commit       # commit time, 1 vs 8 GiB of output
//!   cargo run --release -p nightshift-bench -- gpu          # pipeline vs bare ORT-CUDA loop: MLP, encoder
//!   cargo run --release -p nightshift-bench -- padding      # text jobs' padding vs fixed batches
//!   cargo run --release -p nightshift-bench -- text         # text embedding vs the usual Python way
//!   cargo run --release -p nightshift-bench -- planning     # submit, first lease, planning of 100,000 files

mod commit;
mod encoder;
mod gpu;
mod lease;
mod load;
mod padding;
mod pipeline;
mod planning;
mod storage;
mod text;

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
    /// Many simulated workers (the real lease protocol, no model) against one coordinator
    /// process over PostgreSQL: endpoint latency percentiles, claims/s, statements/s, RSS.
    Load(load::Args),
    /// Commit time of a job with 1 GiB and one with 8 GiB of output (local files; smaller on
    /// the local S3 server): the commit moves or copies whole files, so it should not grow.
    Commit(commit::Args),
    /// On a GPU machine: the worker pipeline against a bare ONNX Runtime CUDA loop on the wide
    /// MLP and on a transformer encoder (float32 and float16), with GPU busy sampled (without a
    /// GPU it says so and exits 0; `--cpu-check` runs the same on the CPU).
    Gpu(gpu::Args),
    /// Object storage against a local S3 server: bytes fetched per byte a Parquet read needs,
    /// and PartUpload throughput over one plain put.
    Storage(storage::Args),
    /// Text jobs: real tokens / padded tokens when rows are grouped by length, against
    /// fixed-size row batches in input order.
    Padding(padding::Args),
    /// On a GPU machine: text embedding with a MiniLM-shaped encoder through the pipeline
    /// against tokenizers + length sort + ONNX Runtime CUDA in Python, with GPU busy sampled.
    Text(text::Args),
    /// Background planning of a job over many small input files (SQLite + local files, and
    /// PostgreSQL + the local S3 server): submit time, time to the first lease, time until
    /// planning ends, whether the plan is exact, and the coordinator's peak RSS.
    Planning(planning::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    nightshift_worker::allocator::tune();
    // The benches that time the worker pipeline run it as `nightshift worker` does, and their
    // baselines in the same process under the same policy.
    if matches!(
        cli.command,
        Command::Pipeline(_) | Command::Gpu(_) | Command::Padding(_) | Command::Text(_)
    ) {
        nightshift_worker::scheduling::batch_policy()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Pipeline(a) => pipeline::run(a).await,
            Command::Lease(a) => lease::run(a).await,
            Command::Load(a) => load::run(a).await,
            Command::Storage(a) => storage::run(a).await,
            Command::Commit(a) => commit::run(a).await,
            Command::Gpu(a) => gpu::run(a).await,
            Command::Padding(a) => padding::run(a).await,
            Command::Text(a) => text::run(a).await,
            Command::Planning(a) => planning::run(a).await,
        }
    })
}
