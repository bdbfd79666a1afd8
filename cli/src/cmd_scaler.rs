//! `nightshift scaler`: sizes a fleet of workers to the work. It reads the coordinator's fleet
//! view (pending rows, deadlines, workers, scheduled runs), decides how many workers the work
//! needs, and buys them from EC2 (spot first, on demand when spot is short), draining and
//! terminating surplus workers once they hold no lease. Run one per fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_fleet::{LoopConfig, Policy, Provider, Scaler, ScalerMetrics};
use tokio_util::sync::CancellationToken;

use crate::api_client::ApiArgs;
use crate::cmd_cluster::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// EC2: CreateFleet (instant) from a launch template, spot first.
    Ec2,
    /// Decide, log and export only; launch and terminate nothing.
    None,
}

#[derive(clap::Args, Debug)]
pub struct ScalerArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Where workers come from.
    #[arg(long, value_enum, default_value = "ec2")]
    pub provider: ProviderKind,
    /// Names the fleet in its instances' tags (`nightshift:fleet`).
    #[arg(long, default_value = "nightshift")]
    pub fleet_name: String,
    #[arg(long, default_value_t = 0)]
    pub min_workers: u32,
    #[arg(long, default_value_t = 10)]
    pub max_workers: u32,
    /// Scale-down waits until fewer workers were wanted for this long (scale-up is at once).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub stabilization: Duration,
    /// Without a deadline, pending rows should be done within this long.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub target_drain: Duration,
    /// From launch to a worker's first claim.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub boot_time: Duration,
    /// A worker's rows/s until one has been measured.
    #[arg(long, default_value_t = 1000.0)]
    pub default_rows_per_s: f64,
    /// Idle workers kept around each scheduled run.
    #[arg(long, default_value_t = 0)]
    pub warm_pool: u32,
    /// The warm pool starts this long before a scheduled run...
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub warm_ahead: Duration,
    /// ...and is held this long after it.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub warm_hold: Duration,
    /// A worker not heard from this long (holding no lease) is gone: its instance is
    /// terminated and replaced.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub lost_after: Duration,
    /// After instances never start a worker, launches wait this long, doubling with each
    /// further round up to `--launch-backoff-max`, then one instance is tried at a time until
    /// a worker starts (0s: replace them at once).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub launch_backoff: Duration,
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub launch_backoff_max: Duration,
    /// Time between decisions.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Serves `/metrics` and `/healthz`.
    #[arg(long, default_value = "0.0.0.0:7071")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub ec2: Ec2Args,
    #[arg(long)]
    pub log_json: bool,
}

#[derive(clap::Args, Debug)]
pub struct Ec2Args {
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Another EC2 endpoint (an emulator in tests).
    #[arg(long, env = "NIGHTSHIFT_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,
    /// The launch template workers start from; its user-data starts `nightshift worker`.
    #[arg(long, default_value = "nightshift-worker")]
    pub launch_template: String,
    /// With `--user-data`: create the launch template when it does not exist, from this AMI.
    #[arg(long, requires = "user_data")]
    pub image_id: Option<String>,
    /// The user-data of a template created here (see deploy/ec2/user-data.sh).
    #[arg(long, requires = "image_id")]
    pub user_data: Option<PathBuf>,
    /// Instance types to ask for (repeat; capacity-optimized across all of them).
    #[arg(long = "instance-type")]
    pub instance_types: Vec<String>,
    /// Subnets to launch in (repeat; default: the template's).
    #[arg(long = "subnet")]
    pub subnets: Vec<String>,
    /// Do not fall back to on-demand instances when spot capacity is short.
    #[arg(long)]
    pub no_on_demand_fallback: bool,
}

fn policy(args: &ScalerArgs) -> Result<Policy> {
    if args.max_workers < args.min_workers {
        bail!(
            "--max-workers {} is below --min-workers {}",
            args.max_workers,
            args.min_workers
        );
    }
    if !(args.default_rows_per_s.is_finite() && args.default_rows_per_s > 0.0) {
        bail!("--default-rows-per-s must be a number above 0");
    }
    if args.launch_backoff_max < args.launch_backoff {
        bail!(
            "--launch-backoff-max {:?} is below --launch-backoff {:?}",
            args.launch_backoff_max,
            args.launch_backoff
        );
    }
    Ok(Policy {
        min_workers: args.min_workers,
        max_workers: args.max_workers,
        stabilization: args.stabilization,
        target_drain: args.target_drain,
        boot_time: args.boot_time,
        default_rows_per_s: args.default_rows_per_s,
        warm_pool: args.warm_pool,
        warm_ahead: args.warm_ahead,
        warm_hold: args.warm_hold,
        lost_after: args.lost_after,
        launch_backoff: args.launch_backoff,
        launch_backoff_max: args.launch_backoff_max,
    })
}

pub async fn scaler(args: ScalerArgs) -> Result<ExitCode> {
    crate::logging::init("info", args.log_json);
    let token = crate::token_files::one(
        args.api.token.as_deref(),
        args.api.token_file.as_deref(),
        "--token or --token-file (NIGHTSHIFT_TOKEN or NIGHTSHIFT_TOKEN_FILE): a submit token",
    )?;
    let config = LoopConfig {
        coordinator: args.api.coordinator.clone(),
        token,
        interval: args.interval,
    };
    let scaler = Scaler::new(policy(&args)?);
    match args.provider {
        ProviderKind::None => run(config, nightshift_fleet::DryRun, scaler, args.listen).await,
        ProviderKind::Ec2 => run(config, ec2(&args).await?, scaler, args.listen).await,
    }
}

async fn run<P: Provider>(
    config: LoopConfig,
    provider: P,
    scaler: Scaler,
    listen: SocketAddr,
) -> Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let _signals = crate::signals::cancel_on_signal(shutdown.clone());
    let metrics = ScalerMetrics::default();
    let server = tokio::spawn(metrics.clone().serve(listen, shutdown.clone()));
    let result = nightshift_fleet::run(config, provider, scaler, metrics, shutdown.clone()).await;
    shutdown.cancel();
    server.await??;
    result.map(|()| ExitCode::SUCCESS)
}

#[cfg(feature = "ec2")]
async fn ec2(args: &ScalerArgs) -> Result<nightshift_fleet::Ec2Provider> {
    use nightshift_fleet::{Ec2Config, Ec2Provider, LaunchTemplate};
    let ec2 = &args.ec2;
    if ec2.instance_types.is_empty() {
        bail!("--provider ec2 needs at least one --instance-type");
    }
    let launch_template = match (&ec2.image_id, &ec2.user_data) {
        (Some(image_id), Some(path)) => LaunchTemplate::Ensure {
            name: ec2.launch_template.clone(),
            image_id: image_id.clone(),
            user_data: std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read --user-data {}: {e}", path.display()))?,
        },
        _ => LaunchTemplate::Existing {
            name: ec2.launch_template.clone(),
        },
    };
    Ok(Ec2Provider::connect(Ec2Config {
        fleet_name: args.fleet_name.clone(),
        region: ec2.region.clone(),
        endpoint: ec2.ec2_endpoint.clone(),
        launch_template,
        instance_types: ec2.instance_types.clone(),
        subnets: ec2.subnets.clone(),
        on_demand_fallback: !ec2.no_on_demand_fallback,
    })
    .await?)
}

#[cfg(not(feature = "ec2"))]
async fn ec2(_: &ScalerArgs) -> Result<nightshift_fleet::DryRun> {
    bail!("this nightshift was built without the `ec2` feature: use --provider none")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        scaler: ScalerArgs,
    }

    fn policy_of(flags: &[&str]) -> Result<Policy> {
        let args = Args::try_parse_from(
            ["scaler", "--coordinator", "http://127.0.0.1:1"]
                .iter()
                .chain(flags),
        )?;
        policy(&args.scaler)
    }

    #[test]
    fn launch_backoff_flags_reach_the_policy_and_a_maximum_below_the_first_hold_is_refused() {
        let p = policy_of(&[]).unwrap();
        assert_eq!(
            (p.launch_backoff, p.launch_backoff_max),
            (Duration::from_secs(300), Duration::from_secs(1800))
        );
        let p = policy_of(&["--launch-backoff", "0s"]).unwrap();
        assert!(p.launch_backoff.is_zero());
        let e = policy_of(&["--launch-backoff", "10m", "--launch-backoff-max", "2m"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--launch-backoff-max 120s is below --launch-backoff 600s"
        );
        let e = policy_of(&["--min-workers", "3", "--max-workers", "2"]).unwrap_err();
        assert!(e.to_string().contains("--max-workers 2"), "{e}");
    }
}
