//! `nightshift-bench`: throughput measured as ratios against a baseline run in the same
//! process, never as pass/fail timings.
//!
//!   cargo run --release -p nightshift-bench -- pipeline     # worker pipeline vs bare ONNX Runtime

mod pipeline;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Pipeline(a) => pipeline::run(a).await,
        }
    })
}
