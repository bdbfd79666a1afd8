//! `--gpus` for the commands that run models, and `nightshift gpus`: the GPUs this machine
//! has, as a worker would find them.

use std::process::ExitCode;

use anyhow::Result;
use nightshift_worker::gpus::{GpuInfo, GpuSelection, discover};

/// Which GPUs to use.
#[derive(clap::Args, Debug, Clone)]
pub struct GpuArgs {
    /// GPUs to use: `all` (every one found; none where there is none), `none` (models with
    /// `device = "auto"` run on the CPU), or device numbers such as `0,2`. One slot per GPU
    /// unless `--slots`/`--workers` say otherwise.
    #[arg(long, default_value = "all", value_parser = parse_gpus)]
    pub gpus: GpuSelection,
}

fn parse_gpus(s: &str) -> Result<GpuSelection, String> {
    s.parse()
        .map_err(|e: nightshift_worker::gpus::GpuError| e.to_string())
}

impl GpuArgs {
    /// The chosen GPUs among those found.
    pub fn selected(&self) -> Result<Vec<GpuInfo>> {
        let found = discover()?;
        let chosen = self.gpus.resolve(&found)?;
        for g in &chosen {
            tracing::info!(gpu = g.index, name = %g.name, memory_gib = g.memory_bytes as f64 / (1u64 << 30) as f64, "using GPU");
        }
        Ok(chosen)
    }
}

#[derive(clap::Args, Debug)]
pub struct GpusArgs {
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn gpus(args: GpusArgs) -> Result<ExitCode> {
    let found = discover()?;
    if args.json {
        println!("{}", serde_json::to_string(&found)?);
    } else if found.is_empty() {
        println!("no GPU found (no CUDA driver, or no device): models run on the CPU");
    } else {
        for g in &found {
            println!(
                "{}  {}  {:.1} GiB  compute {}.{}",
                g.index,
                g.name,
                g.memory_bytes as f64 / (1u64 << 30) as f64,
                g.compute_capability.0,
                g.compute_capability.1
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
