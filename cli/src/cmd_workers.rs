//! `workers` and `drain`: the workers a coordinator saw lately, and asking one to drain (to
//! take its machine down without losing its work).

use std::process::ExitCode;

use anyhow::Result;
use nightshift_proto::wire::{Ack, WorkerList, WorkerView};

use crate::api_client::{ApiArgs, ApiClient};

#[derive(clap::Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    /// The worker's id, as `nightshift workers` lists it.
    pub worker: String,
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub json: bool,
}

pub async fn workers(args: WorkersArgs) -> Result<ExitCode> {
    let list: WorkerList = ApiClient::new(&args.api)?.get_path("/v1/workers").await?;
    if args.json {
        println!("{}", serde_json::to_string(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<36} {:>5} {:>6} {:>10} {:>8}  drain",
        "worker", "machine", "slots", "leases", "rows/s", "gpu busy"
    );
    for w in &list.workers {
        println!(
            "{:<32} {:<36} {:>5} {:>6} {:>10.0} {:>8}  {}",
            w.id,
            machine(w),
            w.slots.map_or("-".into(), |n| n.to_string()),
            w.leases.len(),
            w.rows_per_s,
            gpu_busy(w),
            drain_state(w)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(args: DrainArgs) -> Result<ExitCode> {
    let path = nightshift_proto::drain_path(&args.worker);
    let ack: Ack = ApiClient::new(&args.api)?
        .post_path(&path, None::<&()>)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string(&ack)?);
    } else {
        eprintln!(
            "worker `{}` drains: at its next claim or heartbeat it takes no new shard, finishes \
             and checkpoints what it holds, releases it and exits",
            args.worker
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `i-0abc g5.xlarge spot`, or `-` for a worker that did not say.
fn machine(w: &WorkerView) -> String {
    w.instance.as_ref().map_or("-".into(), |i| {
        format!("{} {} {}", i.id, i.instance_type, i.capacity_type)
    })
}

/// The mean utilization of its GPUs, as its last heartbeat reported them.
fn gpu_busy(w: &WorkerView) -> String {
    if w.gpus.is_empty() {
        return "-".into();
    }
    let sum: u32 = w.gpus.iter().map(|g| g.utilization_percent).sum();
    format!("{}%", sum / w.gpus.len() as u32)
}

/// `-`, `asked` (a drain was asked, the worker has not heard it yet) or `told` (it has: its
/// machine may go once it holds no lease).
fn drain_state(w: &WorkerView) -> &'static str {
    match (w.draining, w.drain_told) {
        (_, true) => "told",
        (true, false) => "asked",
        (false, false) => "-",
    }
}
