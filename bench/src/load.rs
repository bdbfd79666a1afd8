//! The load harness of issue 15: many simulated workers (no model; the real HTTP lease protocol
//! with heartbeats, claims, checkpoints and completions at a worker's intervals) against one
//! `nightshift coordinator` process over PostgreSQL on this machine, bounded in time:
//!
//!   cargo build --release -p nightshift && \
//!   cargo run --release -p nightshift-bench -- load --workers 1000
//!
//! Prints each worker endpoint's latency percentiles, claims/s, PostgreSQL statements and
//! transactions per second, leases lost (none should be: heartbeats are far inside the TTL, so
//! a lost lease means the coordinator was too slow to renew it), re-grants, and the
//! coordinator's peak RSS and CPU. Simulated workers, coordinator and PostgreSQL share the
//! machine's cores.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_tests::load::{LoadPlan, LoadRig, print_report, simulate};

/// Worker endpoints the p99 target applies to, and the target.
const P99_TARGET_MS: f64 = 50.0;
/// Pending shards kept beyond what the run can finish, so no worker ever idles for lack of work.
const SHARD_MARGIN: usize = 2;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    #[arg(long, default_value_t = 2)]
    slots: u32,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 2000)]
    checkpoint_ms: u64,
    /// Checkpoints (one row each) per shard: a shard lasts this many checkpoint intervals.
    #[arg(long, default_value_t = 5)]
    rows_per_shard: u64,
    /// Idle poll of a worker with a free slot and nothing granted (the worker's default).
    #[arg(long, default_value_t = 500)]
    idle_poll_ms: u64,
    /// Seconds over which the workers start, evenly spread.
    #[arg(long, default_value_t = 5.0)]
    ramp: f64,
    /// Seconds the whole fleet runs after the ramp.
    #[arg(long, default_value_t = 60.0)]
    secs: f64,
    /// The `nightshift` binary that serves as coordinator.
    #[arg(long, default_value = "target/release/nightshift")]
    bin: PathBuf,
    /// Run PostgreSQL with the test harness's settings (fsync, synchronous_commit and
    /// full_page_writes off): not durable, so not what production sees.
    #[arg(long)]
    fast_pg: bool,
    /// Also print the N statements that took PostgreSQL the most time.
    #[arg(long, default_value_t = 0)]
    top_statements: i64,
}

pub async fn run(a: Args) -> Result<()> {
    if a.workers == 0 || a.slots == 0 || a.rows_per_shard == 0 {
        bail!("--workers, --slots and --rows-per-shard must be at least 1");
    }
    if !a.bin.exists() {
        bail!(
            "no coordinator binary at `{}`: build it (cargo build --release -p nightshift) or pass --bin",
            a.bin.display()
        );
    }
    let plan = LoadPlan {
        workers: a.workers,
        slots: a.slots,
        heartbeat_every: Duration::from_millis(a.heartbeat_ms),
        checkpoint_every: Duration::from_millis(a.checkpoint_ms),
        checkpoints_per_shard: a.rows_per_shard,
        idle_poll: Duration::from_millis(a.idle_poll_ms),
        ramp: Duration::from_secs_f64(a.ramp),
        duration: Duration::from_secs_f64(a.secs),
    };
    let rig = LoadRig::start(&a.bin, shards_needed(&a), a.rows_per_shard, !a.fast_pg).await?;
    println!(
        "load harness: one coordinator (pid {}) and PostgreSQL ({}) on {} cores, shared with the simulated workers",
        rig.coordinator.child.id(),
        if a.fast_pg {
            "--fast-pg: not durable"
        } else {
            "default durability"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (db0, cpu0) = (rig.db_counters().await?, rig.coordinator_cpu_secs());
    let report = simulate(&rig, &plan).await?;
    let (db1, cpu1) = (rig.db_counters().await?, rig.coordinator_cpu_secs());
    let secs = report.elapsed.as_secs_f64();
    print_report(&plan, &report, secs);
    println!(
        "postgres: {:.0} statements/s, {:.0} transactions/s",
        (db1.statements - db0.statements) as f64 / secs,
        (db1.transactions - db0.transactions) as f64 / secs
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        println!("coordinator CPU: {:.2} cores on average", (c1 - c0) / secs);
    }
    if let Some(rss) = rig.coordinator_peak_rss() {
        println!(
            "coordinator peak RSS: {:.0} MiB",
            rss as f64 / f64::from(1 << 20)
        );
    }
    println!("shards granted more than once: {}", rig.regrants().await?);
    for (calls, ms, query) in rig.top_statements(a.top_statements).await? {
        let query: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
        println!("  {calls:>8} calls {ms:>10.0} ms  {}", excerpt(&query));
    }
    let worst = report
        .latency
        .iter()
        .max_by(|a, b| a.1.p99_ms.total_cmp(&b.1.p99_ms));
    if let Some((name, l)) = worst {
        println!(
            "worst p99: {name} {:.2} ms (issue 15's target: < {P99_TARGET_MS} ms)",
            l.p99_ms
        );
    }
    Ok(())
}

/// The start of a statement, on one line.
fn excerpt(query: &str) -> String {
    const SHOWN: usize = 160;
    query.chars().take(SHOWN).collect()
}

/// Shards enough that the fleet never runs out within the run.
fn shards_needed(a: &Args) -> usize {
    let shard_secs = a.rows_per_shard as f64 * a.checkpoint_ms as f64 / 1000.0;
    let rounds = ((a.ramp + a.secs) / shard_secs).ceil() as usize + 1;
    a.workers * a.slots as usize * rounds * SHARD_MARGIN
}
