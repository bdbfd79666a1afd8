//! `nightshift`: run a job locally, or run and drive a cluster (coordinator, worker, submit,
//! jobs, status, watch, cancel, retry, workers, drain).

mod api_client;
mod cmd_cluster;
mod cmd_gpus;
mod cmd_jobs;
mod cmd_run;
mod cmd_scaler;
mod cmd_schedule;
mod cmd_workers;
mod logging;
mod progress;
mod signals;
mod spec_file;
mod token_files;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api_client::JobAction;

#[derive(Parser)]
#[command(
    name = "nightshift",
    version,
    about = "Batch inference over Parquet with ONNX models, resumable and exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on this machine: plan, run local workers, commit. Resumes after a crash.
    Run(cmd_run::RunArgs),
    /// Serve the API and run the background loops against PostgreSQL (or SQLite).
    Coordinator(cmd_cluster::CoordinatorArgs),
    /// Lease shards from a coordinator and run them.
    Worker(cmd_cluster::WorkerArgs),
    /// Submit a job to a coordinator.
    Submit(cmd_jobs::SubmitArgs),
    /// List jobs.
    Jobs(cmd_jobs::JobsArgs),
    /// Show one job.
    Status(cmd_jobs::JobArgs),
    /// Follow one job until it ends; exits non-zero unless it succeeded.
    Watch(cmd_jobs::JobArgs),
    /// Cancel a job.
    Cancel(cmd_jobs::JobArgs),
    /// Run a failed or cancelled job again: its dead and unfinished shards, keeping its
    /// committed parts.
    Retry(cmd_jobs::JobArgs),
    /// List the workers the coordinator saw lately: machine, slots, leases, rows/s, GPU busy,
    /// drain.
    Workers(cmd_workers::WorkersArgs),
    /// Ask a worker to drain: it takes no new shard, finishes and checkpoints what it holds,
    /// releases it and exits (to take its machine down without losing work).
    Drain(cmd_workers::DrainArgs),
    /// Run a job spec on a cron schedule: create, list, show, pause, resume, delete.
    #[command(subcommand)]
    Schedule(cmd_schedule::ScheduleCommand),
    /// Size a fleet of workers to the work: launch (EC2 spot first), drain and terminate.
    Scaler(Box<cmd_scaler::ScalerArgs>),
    /// List the GPUs of this machine, as a worker finds them (none without a CUDA driver).
    Gpus(cmd_gpus::GpusArgs),
}

/// Where ONNX Runtime's library is, for the commands that run models.
#[derive(clap::Args, Debug, Clone)]
pub struct OrtArgs {
    /// Path to libonnxruntime.so (default: ORT_DYLIB_PATH, then the onnxruntime wheel in .venv).
    #[arg(long = "ort-lib", value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nightshift_coordinator::failpoints_from_env();
    nightshift_worker::allocator::tune();
    // Before any thread starts: the runtime's and ONNX Runtime's threads inherit the policy.
    if matches!(cli.command, Command::Run(_) | Command::Worker(_))
        && let Err(e) = nightshift_worker::scheduling::batch_policy()
    {
        eprintln!("warning: the pipeline keeps the default CPU scheduling policy: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(a) => cmd_run::run(a).await,
            Command::Coordinator(a) => cmd_cluster::coordinator(a).await,
            Command::Worker(a) => cmd_cluster::worker(a).await,
            Command::Submit(a) => cmd_jobs::submit(a).await,
            Command::Jobs(a) => cmd_jobs::jobs(a).await,
            Command::Status(a) => cmd_jobs::status(a).await,
            Command::Watch(a) => cmd_jobs::watch(a).await,
            Command::Cancel(a) => cmd_jobs::act(a, JobAction::Cancel).await,
            Command::Retry(a) => cmd_jobs::act(a, JobAction::Retry).await,
            Command::Workers(a) => cmd_workers::workers(a).await,
            Command::Drain(a) => cmd_workers::drain(a).await,
            Command::Schedule(c) => cmd_schedule::run(c).await,
            Command::Gpus(a) => cmd_gpus::gpus(a),
            Command::Scaler(a) => cmd_scaler::scaler(*a).await,
        }
    });
    // Workers' inference threads may still hold sessions; do not wait for stragglers.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
