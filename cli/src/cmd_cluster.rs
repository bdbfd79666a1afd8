//! `coordinator` and `worker`: the two long-running roles of a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_coordinator::{AllowList, CallbackConfig, Coordinator, CoordinatorConfig};
use nightshift_metastore::LeaseTiming;
use nightshift_metastore::speculation::SpeculationPolicy;
use nightshift_proto::{CapacityType, InstanceInfo};
use nightshift_storage::Stores;
use nightshift_worker::spot::SpotWatcher;
use nightshift_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::OrtArgs;
use crate::cmd_gpus::GpuArgs;
use crate::token_files;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// postgres://... (or a SQLite file for one machine).
    #[arg(long, env = "NIGHTSHIFT_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Database connections this replica may hold open at once (PostgreSQL), in all: size it
    /// so that every replica's fit the server's `max_connections`.
    #[arg(long, env = "NIGHTSHIFT_DB_CONNECTIONS",
          default_value_t = nightshift_metastore::postgres::DEFAULT_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(i64::from(nightshift_metastore::postgres::MIN_CONNECTIONS)..))]
    pub db_connections: u32,
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// Tokens that may submit and manage jobs (repeat, or comma-separated in the env).
    #[arg(
        long = "submit-token",
        env = "NIGHTSHIFT_SUBMIT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub submit_tokens: Vec<String>,
    /// Tokens workers use.
    #[arg(
        long = "worker-token",
        env = "NIGHTSHIFT_WORKER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub worker_tokens: Vec<String>,
    /// Files of submit tokens, one per line (repeat): a mounted secret, kept out of `ps`.
    #[arg(long = "submit-token-file", env = "NIGHTSHIFT_SUBMIT_TOKEN_FILE")]
    pub submit_token_files: Vec<PathBuf>,
    /// Files of worker tokens, one per line (repeat).
    #[arg(long = "worker-token-file", env = "NIGHTSHIFT_WORKER_TOKEN_FILE")]
    pub worker_token_files: Vec<PathBuf>,
    /// URI prefixes specs may name (repeat). Without any, local paths are refused.
    #[arg(long = "allow-uri")]
    pub allow_uri: Vec<String>,
    /// Lease time to live; workers heartbeat at a third of it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
    /// First retry delay of a failed or expired shard (doubles per attempt).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// The longest retry delay.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub retry_backoff_max: Duration,
    /// Jobs that may run at once; more wait as `queued` and start in priority, then
    /// submission order.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running_jobs: Option<u32>,
    /// Where a job's final status is POSTed when the job names no `[notify] url`.
    #[arg(long, env = "NIGHTSHIFT_NOTIFY_URL")]
    pub notify_url: Option<String>,
    /// File holding the secret callbacks are signed with (HMAC-SHA256 of the body, in the
    /// `x-nightshift-signature` header). Without it, jobs that want a callback are refused.
    #[arg(long, env = "NIGHTSHIFT_NOTIFY_SECRET_FILE")]
    pub notify_secret_file: Option<PathBuf>,
    /// A callback not acknowledged within this long after its job ended is given up.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub notify_deadline: Duration,
    /// Dollars per hour by instance type (TOML: `[prices."g5.xlarge"] spot = 0.45`,
    /// `on-demand = 1.006`), for each job's cost report.
    #[arg(long, env = "NIGHTSHIFT_PRICE_TABLE")]
    pub price_table: Option<PathBuf>,
    #[command(flatten)]
    pub speculation: SpeculationArgs,
    /// Print logs as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

/// When a straggling shard gets a speculative copy on an idle worker.
#[derive(clap::Args, Debug)]
pub struct SpeculationArgs {
    /// A job is in its tail, where stragglers are copied, when at most this many of its
    /// shards are left (none pending); 0 turns speculation off.
    #[arg(long, default_value_t = SpeculationPolicy::default().max_left)]
    pub speculate_max_left: u32,
    /// A shard held this many times longer than its rows take at the job's median rate is a
    /// straggler.
    #[arg(long, default_value_t = SpeculationPolicy::default().slowness, value_parser = parse_slowness)]
    pub speculate_slowness: f64,
    /// Shards a job must have finished before its median rate is trusted.
    #[arg(long, default_value_t = SpeculationPolicy::default().min_done,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub speculate_min_done: u32,
}

impl SpeculationArgs {
    pub fn policy(&self) -> Option<SpeculationPolicy> {
        (self.speculate_max_left > 0).then_some(SpeculationPolicy {
            max_left: self.speculate_max_left,
            slowness: self.speculate_slowness,
            min_done: self.speculate_min_done,
        })
    }
}

/// A slowness factor: a finite number above 1.
fn parse_slowness(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 1.0 => Ok(f),
        _ => Err(format!("`{s}` is not a number above 1")),
    }
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, env = "NIGHTSHIFT_COORDINATOR")]
    pub coordinator: String,
    /// A worker token.
    #[arg(long, env = "NIGHTSHIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the worker token (a mounted secret).
    #[arg(long, env = "NIGHTSHIFT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Shards run at once (default: one per GPU used, else 1).
    #[arg(long)]
    pub slots: Option<usize>,
    #[command(flatten)]
    pub gpus: GpuArgs,
    /// Time allowed to finish, checkpoint and release after SIGTERM or a spot notice.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// ONNX Runtime intra-op threads per slot (0: its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Model sessions each slot keeps loaded across shards and jobs (the least recently used
    /// is dropped first, and sooner when the GPU runs short of memory).
    #[arg(long, default_value_t = nightshift_worker::DEFAULT_MODEL_CACHE,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub model_cache: usize,
    /// Where models fetched from object stores are cached.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Instance metadata endpoint polled for spot interruption notices (IMDSv2), or `off`.
    /// The default is EC2's; when nothing answers there, polling stops.
    #[arg(long, default_value = nightshift_worker::spot::EC2_METADATA)]
    pub spot_metadata: String,
    /// How often to poll for a spot notice.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub spot_poll: Duration,
    /// The cloud instance this worker runs on (default: from the instance metadata service).
    #[arg(long, env = "NIGHTSHIFT_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Its instance type, the key of the coordinator's price table (default: from the
    /// instance metadata service).
    #[arg(long, env = "NIGHTSHIFT_INSTANCE_TYPE")]
    pub instance_type: Option<String>,
    /// How the instance is bought (default: from the instance metadata service).
    #[arg(long, env = "NIGHTSHIFT_CAPACITY_TYPE", value_parser = parse_capacity_type)]
    pub capacity_type: Option<CapacityType>,
    #[command(flatten)]
    pub ort: OrtArgs,
    #[arg(long)]
    pub log_json: bool,
}

/// `90s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub async fn coordinator(args: CoordinatorArgs) -> Result<ExitCode> {
    crate::logging::init("info", args.log_json);
    let callbacks = callbacks(&args)?;
    let submit = token_files::all(args.submit_tokens, &args.submit_token_files)?;
    let worker = token_files::all(args.worker_tokens, &args.worker_token_files)?;
    if submit.is_empty() || worker.is_empty() {
        bail!(
            "give at least one --submit-token and one --worker-token (or NIGHTSHIFT_SUBMIT_TOKENS / NIGHTSHIFT_WORKER_TOKENS, or --submit-token-file / --worker-token-file)"
        );
    }
    let store = nightshift_metastore::open_with(&args.database_url, args.db_connections).await?;
    let stores = Arc::new(Stores::new(
        nightshift_storage::s3::S3Settings::load().await,
    ));
    let mut config = CoordinatorConfig::new(args.listen);
    config.submit_tokens = submit;
    config.worker_tokens = worker;
    config.allow = AllowList::new(args.allow_uri);
    config.callbacks = callbacks;
    config.max_running_jobs = args.max_running_jobs;
    config.speculation = args.speculation.policy();
    if let Some(path) = &args.price_table {
        config.prices = nightshift_coordinator::PriceTable::load(path)?;
    }
    config.timing = LeaseTiming {
        ttl_ms: args.lease_ttl.as_millis() as i64,
        backoff_base_ms: args.retry_backoff.as_millis() as i64,
        backoff_max_ms: args.retry_backoff_max.as_millis() as i64,
    };
    let coordinator = Coordinator::new(config, store, stores);
    let listener = coordinator.bind().await?;
    let shutdown = CancellationToken::new();
    let _signals = crate::signals::cancel_on_signal(shutdown.clone());
    coordinator.run(listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Completion callbacks as the flags set them: the default URL checked like a spec's, the
/// secret read from its file.
fn callbacks(args: &CoordinatorArgs) -> Result<CallbackConfig> {
    if let Some(url) = &args.notify_url {
        nightshift_proto::spec_check::check_callback_url(url)
            .map_err(|e| anyhow::anyhow!("--notify-url: {e}"))?;
    }
    let secret = match &args.notify_secret_file {
        Some(path) => Some(token_files::read(path)?.swap_remove(0).into_bytes().into()),
        None => None,
    };
    Ok(CallbackConfig {
        default_url: args.notify_url.clone(),
        secret,
        deadline: args.notify_deadline,
        ..CallbackConfig::default()
    })
}

pub async fn worker(args: WorkerArgs) -> Result<ExitCode> {
    crate::logging::init("info", args.log_json);
    let token = token_files::one(
        args.token.as_deref(),
        args.token_file.as_deref(),
        "--token or --token-file (NIGHTSHIFT_TOKEN or NIGHTSHIFT_TOKEN_FILE)",
    )?;
    let mut config = WorkerConfig::new(&args.coordinator, &token);
    config.gpus = args.gpus.selected()?.iter().map(|g| g.index).collect();
    config.slots = args.slots.unwrap_or(config.gpus.len()).max(1);
    config.drain_timeout = args.drain_timeout;
    config.intra_threads = args.threads;
    config.model_cache = args.model_cache;
    config.ort_lib = args.ort.ort_lib.clone();
    if let Some(dir) = args.cache_dir.clone() {
        config.cache_dir = dir;
    }
    if let Some(id) = args.worker_id.clone() {
        config.worker_id = id;
    }
    config.instance = instance(&args).await;
    let explicit = args.spot_metadata != nightshift_worker::spot::EC2_METADATA;
    let insist = nightshift_worker::spot::keeps_polling(explicit, config.instance.as_ref());
    let stores = Arc::new(Stores::new(
        nightshift_storage::s3::S3Settings::load().await,
    ));
    let worker = Worker::build(config, stores)?;
    let shutdown = CancellationToken::new();
    let _signals = crate::signals::cancel_on_signal(shutdown.clone());
    let stop_watching = CancellationToken::new();
    if args.spot_metadata != "off" {
        let watcher = SpotWatcher::new(&args.spot_metadata, args.spot_poll, insist);
        tokio::spawn(watcher.run(shutdown.clone(), stop_watching.clone()));
    }
    let report = worker.run(shutdown).await;
    stop_watching.cancel();
    let report = report?;
    tracing::info!(
        rows = report.rows,
        shards_completed = report.shards_completed,
        shards_released = report.shards_released,
        "worker exited"
    );
    Ok(ExitCode::SUCCESS)
}

/// `spot` or `on-demand`.
fn parse_capacity_type(s: &str) -> Result<CapacityType, String> {
    CapacityType::parse(s).ok_or_else(|| format!("`{s}` is not a capacity type (spot, on-demand)"))
}

/// The machine this worker runs on: the flags, with what they leave out read from the instance
/// metadata service (unless `--spot-metadata off`). None when the id or type stays unknown.
async fn instance(args: &WorkerArgs) -> Option<InstanceInfo> {
    let complete =
        args.instance_id.is_some() && args.instance_type.is_some() && args.capacity_type.is_some();
    let found = if complete || args.spot_metadata == "off" {
        None
    } else {
        match nightshift_worker::spot::instance_identity(&args.spot_metadata).await {
            Ok(found) => Some(found),
            Err(e) => {
                tracing::info!(error = %e, "no instance metadata: the worker's machine is unknown");
                None
            }
        }
    };
    let instance = InstanceInfo {
        id: args
            .instance_id
            .clone()
            .or(found.as_ref().map(|f| f.id.clone()))?,
        instance_type: args
            .instance_type
            .clone()
            .or(found.as_ref().map(|f| f.instance_type.clone()))?,
        capacity_type: args
            .capacity_type
            .or(found.as_ref().map(|f| f.capacity_type))
            .unwrap_or(CapacityType::OnDemand),
    };
    tracing::info!(id = %instance.id, instance_type = %instance.instance_type, capacity_type = %instance.capacity_type, "running on");
    Some(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert!(parse_duration("5y").unwrap_err().contains("unit"));
    }
}
