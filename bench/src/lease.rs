//! The lease layer: shard claims+completes per second and claim latency, with 1, 16 and 64
//! concurrent workers, directly on the PostgreSQL store (`PgStore`, one pool, as one coordinator
//! replica holds) and through the coordinator's HTTP API (served in this process on
//! 127.0.0.1:0, each worker with its own `CoordinatorClient`). The API coalesces concurrent
//! claims and completions (`coordinator/src/coalescer.rs`), so with many workers the HTTP path
//! makes fewer store calls than the direct one.
//!
//! Each measurement gets a fresh database holding one running job of `--shards` pending shards.
//! The shards have 0 rows, so `complete` needs no checkpoint and a cycle is exactly claim +
//! complete; `--checkpoint` gives each shard 1 row and commits a 1-row part before completing.
//! Every worker loops: claim up to `batch` shards, then complete them: one `complete` call
//! each, or (`many`) one `complete_many` call for the whole batch. The first `--warmup`
//! seconds (pool connections, query plans) are not counted; then shards completed within
//! `--secs` are counted and every claim started within them is timed. The server is
//! PostgreSQL with its default settings unless `--fast-pg`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nightshift_coordinator::{AllowList, Coordinator, CoordinatorConfig};
use nightshift_metastore::postgres::PgStore;
use nightshift_metastore::{DynMetastore, LeaseTiming, Metastore, NewJob};
use nightshift_proto::wire::{LeaseRef, PartRecord, ShardLease};
use nightshift_storage::Stores;
use nightshift_tests::PgServer;
use nightshift_tests::load::{Latency, stand_in_plan, stand_in_spec};
use nightshift_tests::parts::write_part;
use nightshift_worker::client::CoordinatorClient;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

const WORKER_TOKEN: &str = "bench-worker";

#[derive(clap::Args)]
pub struct Args {
    /// Concurrent workers, one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    workers: Vec<usize>,
    /// Shards per claim (the `max` of a lease request), one measurement each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16])]
    batch: Vec<u32>,
    /// How workers complete a claimed batch: `each` (one call per shard) and `many` (one
    /// `complete_many` call per batch; measured for batches over 1).
    #[arg(long, value_delimiter = ',', default_values_t = [Completion::Each, Completion::Many])]
    complete: Vec<Completion>,
    /// Paths to measure: `pg` (the store called directly) and `http` (the coordinator's API).
    #[arg(long, value_delimiter = ',', default_values_t = [LeasePath::Pg, LeasePath::Http])]
    paths: Vec<LeasePath>,
    /// Seconds each measurement counts.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Seconds each measurement runs before it starts counting.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Pending shards at the start of each measurement.
    #[arg(long, default_value_t = 100_000)]
    shards: usize,
    /// Give each shard one row and checkpoint a 1-row part before completing it.
    #[arg(long)]
    checkpoint: bool,
    /// Run PostgreSQL with the test harness's settings (fsync, synchronous_commit and
    /// full_page_writes off): not durable, so not what production sees.
    #[arg(long)]
    fast_pg: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LeasePath {
    Pg,
    Http,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Completion {
    Each,
    Many,
}

impl std::fmt::Display for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Completion::Each => "each",
            Completion::Many => "many",
        })
    }
}

impl std::fmt::Display for LeasePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeasePath::Pg => "pg",
            LeasePath::Http => "http",
        })
    }
}

/// What one measurement found.
struct Cell {
    path: LeasePath,
    workers: usize,
    batch: u32,
    completion: Completion,
    shards_per_s: f64,
    claims: usize,
    shards_per_claim: f64,
    claim: Latency,
    complete: Latency,
    /// The job ran out of pending shards before the window ended.
    drained: bool,
}

pub async fn run(a: Args) -> Result<()> {
    if a.workers.contains(&0) || a.batch.contains(&0) {
        bail!("--workers and --batch must be at least 1");
    }
    let pg = if a.fast_pg {
        PgServer::start().await?
    } else {
        PgServer::start_durable().await?
    };
    print_header(&a, &pg).await?;
    let mut cells: Vec<Cell> = Vec::new();
    for &path in &a.paths {
        for &workers in &a.workers {
            for &batch in &a.batch {
                for &completion in &a.complete {
                    if completion == Completion::Many && batch == 1 && a.complete.len() > 1 {
                        continue;
                    }
                    let cell = measure(&a, &pg, path, workers, batch, completion).await?;
                    print_cell(&cell, &cells);
                    cells.push(cell);
                }
            }
        }
    }
    if cells.iter().any(|c| c.drained) {
        println!(
            "* ran out of pending shards before the window ended: raise --shards for a full window"
        );
    }
    Ok(())
}

async fn print_header(a: &Args, pg: &PgServer) -> Result<()> {
    let mut conn = sqlx::postgres::PgConnection::connect(&pg.admin_url()).await?;
    let mut settings = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut conn)
            .await?;
        settings.push(format!("{name}={value}"));
    }
    conn.close().await.ok();
    println!("lease bench: claims+completes per second and claim latency");
    println!(
        "  postgres: {} ({})",
        settings.join(", "),
        if a.fast_pg {
            "--fast-pg: NOT durable, test settings"
        } else {
            "PostgreSQL defaults: every commit waits for its WAL flush"
        }
    );
    println!(
        "  cpus: {}; postgres, coordinator and workers share them",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  cycle: claim up to `batch` shards, {}complete them (each: one call per shard; many: one \
         complete_many call per batch)",
        if a.checkpoint {
            "checkpoint a 1-row part of each, then "
        } else {
            "then "
        }
    );
    println!(
        "  shards: {}; {} pending in a fresh database per row",
        if a.checkpoint {
            "1 row each"
        } else {
            "0 rows each, so completing needs no checkpoint (--checkpoint adds one per shard)"
        },
        a.shards
    );
    println!(
        "  pg: the store called directly, one pool; http: the coordinator's API in this process (which coalesces concurrent\n  claims and completions into one store call each), one client per worker"
    );
    println!(
        "  {} s counted after {} s of warm-up; latencies in ms (done: the completion call, one \
         shard's or the batch's)",
        a.secs, a.warmup
    );
    println!();
    println!(
        "{:<5} {:>7} {:>5} {:>5} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "path",
        "workers",
        "batch",
        "done",
        "shards/s",
        "claims",
        "claim p50",
        "claim p99",
        "done p50",
        "done p99",
        "http/pg"
    );
    Ok(())
}

fn print_cell(c: &Cell, before: &[Cell]) {
    let ratio = before
        .iter()
        .find(|b| {
            b.path == LeasePath::Pg
                && (b.workers, b.batch, b.completion) == (c.workers, c.batch, c.completion)
        })
        .filter(|_| c.path == LeasePath::Http)
        .map(|b| format!("{:.2}", c.shards_per_s / b.shards_per_s))
        .unwrap_or_default();
    println!(
        "{:<5} {:>7} {:>5} {:>5} {:>10.0} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8}{}",
        c.path.to_string(),
        c.workers,
        c.batch,
        c.completion.to_string(),
        c.shards_per_s,
        c.claims,
        c.claim.p50_ms,
        c.claim.p99_ms,
        c.complete.p50_ms,
        c.complete.p99_ms,
        ratio,
        if c.drained { " *" } else { "" }
    );
    if c.batch > 1 && c.shards_per_claim < f64::from(c.batch) {
        println!(
            "      (claims averaged {:.1} shards of the {} asked for)",
            c.shards_per_claim, c.batch
        );
    }
}

/// One worker's side of the lease protocol, on either path.
enum Lessee {
    Metastore(DynMetastore),
    Http(CoordinatorClient),
}

const TIMING: LeaseTiming = LeaseTiming {
    ttl_ms: 30_000,
    backoff_base_ms: 1_000,
    backoff_max_ms: 60_000,
};

impl Lessee {
    async fn claim(&self, worker: &str, max: u32) -> Result<Vec<ShardLease>> {
        Ok(match self {
            Lessee::Metastore(s) => s.claim(worker, max, TIMING).await?,
            Lessee::Http(c) => c.lease(worker, max).await?.leases,
        })
    }

    async fn checkpoint(&self, lease: LeaseRef, part: PartRecord) -> Result<()> {
        match self {
            Lessee::Metastore(s) => s.checkpoint(lease, &part).await?,
            Lessee::Http(c) => c.checkpoint(lease, part, None).await?,
        }
        Ok(())
    }

    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        match self {
            Lessee::Metastore(s) => s.complete(lease).await?,
            Lessee::Http(c) => c.complete(lease).await?,
        }
        Ok(())
    }

    async fn complete_many(&self, leases: &[LeaseRef]) -> Result<()> {
        match self {
            Lessee::Metastore(s) => {
                for answer in s.complete_many(leases).await? {
                    answer?;
                }
            }
            Lessee::Http(c) => {
                for answer in c.complete_many(leases.to_vec()).await? {
                    answer?;
                }
            }
        }
        Ok(())
    }
}

/// What one worker task saw inside the counted window.
#[derive(Default)]
struct Tally {
    shards: usize,
    claimed: usize,
    claims: Vec<Duration>,
    completes: Vec<Duration>,
    drained: bool,
}

async fn measure(
    a: &Args,
    pg: &PgServer,
    path: LeasePath,
    workers: usize,
    batch: u32,
    completion: Completion,
) -> Result<Cell> {
    let url = pg.fresh_database().await?;
    let store = PgStore::connect(&url).await?;
    store.migrate().await?;
    let store: DynMetastore = Arc::new(store);
    let rows = u64::from(a.checkpoint);
    // Parts checkpointed over HTTP must exist where the coordinator expects them: a local
    // output that the workers below write stand-in parts into.
    let out = tempfile::tempdir()?;
    let job = store
        .create_job(NewJob {
            uid: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
            spec: stand_in_spec("lease-bench", &out.path().display().to_string())?,
            idempotency_key: None,
            plan: stand_in_plan(a.shards, rows),
            queued: false,
            planning: false,
        })
        .await?
        .job()
        .id;

    let stop = CancellationToken::new();
    let (base, server) = match path {
        LeasePath::Pg => (None, None),
        LeasePath::Http => {
            let mut config = CoordinatorConfig::new("127.0.0.1:0".parse()?);
            config.worker_tokens = vec![WORKER_TOKEN.into()];
            config.allow = AllowList::everything();
            config.timing = TIMING;
            let coordinator = Coordinator::new(config, store.clone(), Arc::new(Stores::default()));
            let listener = coordinator.bind().await?;
            let base = format!("http://{}", listener.local_addr()?);
            let server = tokio::spawn(coordinator.run(listener, stop.clone()));
            (Some(base), Some(server))
        }
    };

    let start = Instant::now() + Duration::from_millis(50);
    let counted_from = start + Duration::from_secs_f64(a.warmup);
    let end = counted_from + Duration::from_secs_f64(a.secs);
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            // Each worker its own HTTP client (its own connection), as separate processes have.
            let lessee = match &base {
                Some(base) => Lessee::Http(
                    CoordinatorClient::new(base, WORKER_TOKEN).for_worker(&format!("bench-w{w}")),
                ),
                None => Lessee::Metastore(store.clone()),
            };
            let work = Work {
                worker: format!("bench-w{w}"),
                batch,
                completion,
                checkpoint: a.checkpoint,
                counted_from,
                end,
            };
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                work.run(lessee).await
            })
        })
        .collect();
    // Every task ends by `end`; wait for all of them and stop the server before any error.
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.context("bench worker panicked"));
    }
    stop.cancel();
    if let Some(server) = server {
        server.await.context("coordinator panicked")??;
    }
    let mut all = Tally::default();
    for t in results {
        let t = t??;
        all.shards += t.shards;
        all.claimed += t.claimed;
        all.claims.extend(t.claims);
        all.completes.extend(t.completes);
        all.drained |= t.drained;
    }
    // Every shard a worker claimed it also completed: none may be left leased.
    let (counts, _, _) = store.shard_counts(job).await?;
    if counts.leased != 0 {
        bail!("{} shards still leased after the run", counts.leased);
    }
    let claims = all.claims.len();
    Ok(Cell {
        path,
        workers,
        batch,
        completion,
        shards_per_s: all.shards as f64 / a.secs,
        claims,
        shards_per_claim: if claims == 0 {
            0.0
        } else {
            all.claimed as f64 / claims as f64
        },
        claim: Latency::of(all.claims),
        complete: Latency::of(all.completes),
        drained: all.drained,
    })
}

/// One worker: claim, (checkpoint,) complete, until `end`. Claims started and shards finished
/// inside `[counted_from, end)` count.
struct Work {
    worker: String,
    batch: u32,
    completion: Completion,
    checkpoint: bool,
    counted_from: Instant,
    end: Instant,
}

impl Work {
    async fn run(self, lessee: Lessee) -> Result<Tally> {
        let mut t = Tally::default();
        loop {
            let began = Instant::now();
            if began >= self.end {
                return Ok(t);
            }
            let leases = lessee.claim(&self.worker, self.batch).await?;
            if began >= self.counted_from {
                t.claims.push(began.elapsed());
                t.claimed += leases.len();
            }
            if leases.is_empty() {
                t.drained = true;
                return Ok(t);
            }
            let refs: Vec<LeaseRef> = leases.iter().map(|l| l.lease_ref()).collect();
            if self.checkpoint {
                for l in &leases {
                    let part = match lessee {
                        Lessee::Http(_) => write_part(l, 0, 1),
                        Lessee::Metastore(_) => one_row_part(l.lease_ref()),
                    };
                    lessee.checkpoint(l.lease_ref(), part).await?;
                }
            }
            match self.completion {
                Completion::Each => {
                    for &r in &refs {
                        let began = Instant::now();
                        lessee.complete(r).await?;
                        self.count(&mut t, began, 1);
                    }
                }
                Completion::Many => {
                    let began = Instant::now();
                    lessee.complete_many(&refs).await?;
                    self.count(&mut t, began, refs.len());
                }
            }
        }
    }

    /// Counts a completion call that began at `began` and finished `shards` shards just now.
    fn count(&self, t: &mut Tally, began: Instant, shards: usize) {
        let now = Instant::now();
        if began >= self.counted_from && now < self.end {
            t.completes.push(now - began);
        }
        if now >= self.counted_from && now < self.end {
            t.shards += shards;
        }
    }
}

fn one_row_part(lease: LeaseRef) -> PartRecord {
    PartRecord {
        uri: format!("s3://bench/out/part-{}.parquet", lease.shard_id),
        row_start: 0,
        rows: 1,
        bytes: 1,
        error_rows: 0,
        error_uri: None,
        error_bytes: 0,
        tokens: None,
    }
}
