//! A load harness (issue 15): simulated workers, lightweight tasks with no model, that speak the
//! real lease protocol over HTTP to one coordinator: they lease shards into their free slots,
//! heartbeat every lease they hold on a fixed interval, checkpoint a stand-in part of each shard
//! on another, complete a shard once its rows are checkpointed, and release what they hold when
//! the run ends. Every call is timed by endpoint; a lease the coordinator answers as lost is
//! counted (with heartbeats well inside the TTL, none should be). [`LoadRig`] sets up what
//! they run against: a real `nightshift coordinator` process over PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nightshift_metastore::postgres::PgStore;
use nightshift_metastore::{Jobs, Metastore, NewJob};
use nightshift_proto::wire::{
    CheckpointRequest, CompleteRequest, HeartbeatRequest, HeartbeatResponse, InputFile, JobPlan,
    LeaseGrant, LeaseRef, LeaseRequest, LeaseResponse, ReleaseRequest, ShardLease, ShardPlan,
};
use nightshift_proto::{ErrorBody, ErrorCode, JobSpec, LeaseState};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::Connection;

use crate::PgServer;
use crate::cluster::{CoordinatorProc, WORKER_TOKEN};
use crate::parts::{STAND_IN_BODY, link_part};

/// How long one HTTP call may take before the simulated worker counts it as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Error messages kept for the report (the count is complete).
const ERRORS_KEPT: usize = 8;
/// `sysconf(_SC_CLK_TCK)`, the unit of CPU times in `/proc/PID/stat`: 100 on every Linux
/// this runs on.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;
/// Input files the generated plan spreads its shards over.
const PLAN_FILES: usize = 16;

/// What the simulated fleet does.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub workers: usize,
    /// Shards each worker holds at once.
    pub slots: u32,
    pub heartbeat_every: Duration,
    pub checkpoint_every: Duration,
    /// Checkpoints (of one row each) until a shard is done: its rows.
    pub checkpoints_per_shard: u64,
    /// A worker with a free slot and nothing granted asks again after this.
    pub idle_poll: Duration,
    /// Workers start spread evenly over this, as a fleet comes up (and leave as they came).
    pub ramp: Duration,
    /// How long each worker runs.
    pub duration: Duration,
}

/// Latencies of one endpoint, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub calls: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of `v`.
    pub fn of(mut v: Vec<Duration>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1000.0
        };
        Self {
            calls: v.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// What the simulated fleet saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub elapsed: Duration,
    pub latency: BTreeMap<&'static str, Latency>,
    /// Lease requests that granted at least one shard.
    pub claims: u64,
    pub shards_granted: u64,
    pub shards_completed: u64,
    pub shards_released: u64,
    /// Leases the coordinator answered as lost (expired and taken, or fenced).
    pub leases_lost: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
}

/// One worker's counts and timings.
#[derive(Default)]
struct Tally {
    calls: HashMap<&'static str, Vec<Duration>>,
    claims: u64,
    granted: u64,
    completed: u64,
    released: u64,
    lost: u64,
    errors: Vec<String>,
}

/// A call's failure: the lease is gone, or anything else.
enum CallError {
    Lost,
    Other(String),
}

/// A shard a simulated worker holds.
struct Held {
    lease: ShardLease,
    next_row: u64,
    next_checkpoint: Instant,
}

/// One simulated worker: its own HTTP client (its own connections, as a process has).
struct SimWorker {
    id: String,
    http: reqwest::Client,
    base: String,
    /// The file every part this worker writes links to.
    part_body: PathBuf,
    plan: LoadPlan,
    specs: HashMap<String, JobSpec>,
    held: Vec<Held>,
    tally: Tally,
}

/// Runs `plan.workers` simulated workers against the rig's coordinator, started evenly over
/// `plan.ramp`, each for `plan.duration`, after which it releases what it holds (as a
/// draining worker does); answers what they saw.
pub async fn simulate(rig: &LoadRig, plan: &LoadPlan) -> Result<LoadReport> {
    let base = rig.coordinator.url();
    // Every worker's HTTP client is made before the first starts: making one costs a few
    // milliseconds of CPU (its TLS setup reads the platform's certificates), which would
    // otherwise be taken from the coordinator and the database during the ramp.
    let workers: Vec<SimWorker> = (0..plan.workers)
        .map(|i| {
            let id = format!("load-w{i:05}");
            SimWorker::new(id, &base, &rig.part_body, plan.clone())
        })
        .collect();
    let started = Instant::now();
    let step = plan.ramp / plan.workers.max(1) as u32;
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            // Each worker runs `duration` from its own start: they leave as they came.
            let begin = started + step * i as u32;
            tokio::spawn(async move {
                tokio::time::sleep_until(begin.into()).await;
                w.run(begin + w.plan.duration).await;
                w.tally
            })
        })
        .collect();
    let mut report = LoadReport::default();
    let mut calls: HashMap<&'static str, Vec<Duration>> = HashMap::new();
    for t in tasks {
        let t = t.await.context("a simulated worker panicked")?;
        for (k, v) in t.calls {
            calls.entry(k).or_default().extend(v);
        }
        report.claims += t.claims;
        report.shards_granted += t.granted;
        report.shards_completed += t.completed;
        report.shards_released += t.released;
        report.leases_lost += t.lost;
        report.errors += t.errors.len() as u64;
        let room = ERRORS_KEPT.saturating_sub(report.first_errors.len());
        report.first_errors.extend(t.errors.into_iter().take(room));
    }
    report.elapsed = started.elapsed();
    report.latency = calls
        .into_iter()
        .map(|(k, v)| (k, Latency::of(v)))
        .collect();
    Ok(report)
}

impl SimWorker {
    fn new(id: String, base: &str, part_body: &Path, plan: LoadPlan) -> Self {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            id,
            http,
            base: base.trim_end_matches('/').to_string(),
            part_body: part_body.to_path_buf(),
            plan,
            specs: HashMap::new(),
            held: Vec::new(),
            tally: Tally::default(),
        }
    }

    async fn run(&mut self, end: Instant) {
        let mut next_lease = Instant::now();
        let mut next_heartbeat = Instant::now() + self.plan.heartbeat_every;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if self.held.len() < self.plan.slots as usize && now >= next_lease {
                let got = self.lease().await;
                next_lease = Instant::now()
                    + if got {
                        Duration::ZERO
                    } else {
                        self.plan.idle_poll
                    };
            }
            self.checkpoint_due().await;
            if Instant::now() >= next_heartbeat {
                self.heartbeat().await;
                next_heartbeat += self.plan.heartbeat_every;
            }
            let mut wake = next_heartbeat.min(end);
            if self.held.len() < self.plan.slots as usize {
                wake = wake.min(next_lease);
            }
            if let Some(h) = self.held.iter().map(|h| h.next_checkpoint).min() {
                wake = wake.min(h);
            }
            tokio::time::sleep_until(wake.into()).await;
        }
        self.release_all().await;
    }

    /// One timed POST; a refusal naming a lost lease is `Lost`.
    async fn post<B: Serialize, R: DeserializeOwned>(
        &mut self,
        endpoint: &'static str,
        body: &B,
    ) -> Result<R, CallError> {
        let began = Instant::now();
        let sent = self
            .http
            .post(format!("{}/v1/worker/{endpoint}", self.base))
            .bearer_auth(WORKER_TOKEN)
            .json(body)
            .send()
            .await;
        let answer = match sent {
            Ok(resp) => read_answer(resp).await,
            Err(e) => Err(CallError::Other(format!("{endpoint}: {e}"))),
        };
        self.tally
            .calls
            .entry(endpoint)
            .or_default()
            .push(began.elapsed());
        answer
    }

    fn note(&mut self, e: CallError) {
        match e {
            CallError::Lost => self.tally.lost += 1,
            CallError::Other(m) => self.tally.errors.push(m),
        }
    }

    /// Asks for as many shards as there are free slots; whether any was granted.
    async fn lease(&mut self) -> bool {
        let request = LeaseRequest {
            worker_id: self.id.clone(),
            max: self.plan.slots - self.held.len() as u32,
            instance: None,
            slots: Some(self.plan.slots),
            gpus: None,
        };
        let answer: LeaseResponse = match self.post("lease", &request).await {
            Ok(a) => a,
            Err(e) => {
                self.note(e);
                return false;
            }
        };
        let granted = !answer.leases.is_empty();
        self.tally.claims += u64::from(granted);
        for grant in answer.leases {
            self.tally.granted += 1;
            match self.spec(&grant.spec_hash).await {
                Ok(spec) => self.hold(grant, spec),
                Err(e) => self.note(e),
            }
        }
        granted
    }

    fn hold(&mut self, grant: LeaseGrant, spec: JobSpec) {
        self.held.push(Held {
            // A shard granted again goes on from its checkpoint, as a worker's does.
            next_row: grant.checkpoint_rows,
            next_checkpoint: Instant::now() + self.plan.checkpoint_every,
            lease: ShardLease { grant, spec },
        });
    }

    /// The job's spec, fetched once per spec as a worker does.
    async fn spec(&mut self, hash: &str) -> Result<JobSpec, CallError> {
        if let Some(spec) = self.specs.get(hash) {
            return Ok(spec.clone());
        }
        let began = Instant::now();
        let sent = self
            .http
            .get(format!("{}/v1/worker/specs/{hash}", self.base))
            .bearer_auth(WORKER_TOKEN)
            .send()
            .await;
        let answer: Result<JobSpec, CallError> = match sent {
            Ok(resp) => read_answer(resp).await,
            Err(e) => Err(CallError::Other(format!("specs: {e}"))),
        };
        self.tally
            .calls
            .entry("specs")
            .or_default()
            .push(began.elapsed());
        let spec = answer?;
        self.specs.insert(hash.to_string(), spec.clone());
        Ok(spec)
    }

    /// Checkpoints a one-row stand-in part of every shard whose time has come, and completes
    /// the shards whose rows are all checkpointed.
    async fn checkpoint_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.held.len())
            .filter(|&i| self.held[i].next_checkpoint <= now)
            .rev()
            .collect();
        for i in due {
            let h = self.held.swap_remove(i);
            if let Some(h) = self.checkpoint(h).await {
                self.held.push(h);
            }
        }
    }

    /// One checkpoint of `h`; answers it back while it has rows left.
    async fn checkpoint(&mut self, mut h: Held) -> Option<Held> {
        let part = link_part(&h.lease, h.next_row, 1, &self.part_body);
        let request = CheckpointRequest {
            worker_id: self.id.clone(),
            lease: h.lease.lease_ref(),
            part,
            batch_rows: None,
        };
        if let Err(e) = self
            .post::<_, serde_json::Value>("checkpoint", &request)
            .await
        {
            self.note(e);
            return None;
        }
        h.next_row += 1;
        if h.next_row < h.lease.plan.rows {
            h.next_checkpoint += self.plan.checkpoint_every;
            return Some(h);
        }
        let done = CompleteRequest {
            worker_id: self.id.clone(),
            lease: h.lease.lease_ref(),
        };
        match self.post::<_, serde_json::Value>("complete", &done).await {
            Ok(_) => self.tally.completed += 1,
            Err(e) => self.note(e),
        }
        None
    }

    /// One heartbeat for every held lease; a lease answered as not held is dropped.
    async fn heartbeat(&mut self) {
        let request = HeartbeatRequest {
            worker_id: self.id.clone(),
            leases: self.held.iter().map(|h| h.lease.lease_ref()).collect(),
            gpus: Vec::new(),
            models: Vec::new(),
            slots: Some(self.plan.slots),
        };
        let answer: HeartbeatResponse = match self.post("heartbeat", &request).await {
            Ok(a) => a,
            Err(e) => return self.note(e),
        };
        let lost: Vec<LeaseRef> = answer
            .leases
            .iter()
            .filter(|s| s.state != LeaseState::Held)
            .filter_map(|s| {
                self.held
                    .iter()
                    .map(|h| h.lease.lease_ref())
                    .find(|r| (r.shard_id, r.token) == (s.shard_id, s.token))
            })
            .collect();
        self.tally.lost += lost.len() as u64;
        self.held.retain(|h| !lost.contains(&h.lease.lease_ref()));
    }

    /// Hands back every held shard with its progress, as a draining worker does.
    async fn release_all(&mut self) {
        for h in std::mem::take(&mut self.held) {
            let request = ReleaseRequest {
                worker_id: self.id.clone(),
                lease: h.lease.lease_ref(),
            };
            match self.post::<_, serde_json::Value>("release", &request).await {
                Ok(_) => self.tally.released += 1,
                Err(e) => self.note(e),
            }
        }
    }
}

/// A successful answer's JSON, or the refusal: `Lost` when its code says the lease is gone.
async fn read_answer<R: DeserializeOwned>(resp: reqwest::Response) -> Result<R, CallError> {
    let status = resp.status();
    let url = resp.url().path().to_string();
    let text = resp.text().await.unwrap_or_default();
    if status.is_success() {
        return serde_json::from_str(&text)
            .map_err(|e| CallError::Other(format!("{url}: bad answer: {e}")));
    }
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) if b.code == ErrorCode::LeaseLost => Err(CallError::Lost),
        _ => Err(CallError::Other(format!("{url}: {status}: {text}"))),
    }
}

/// A job the store takes as is (its plan is made here, so nothing reads its input or model);
/// stand-in parts go to the local directory `out`.
pub fn stand_in_spec(name: &str, out: &str) -> Result<JobSpec> {
    Ok(JobSpec::from_toml(&format!(
        r#"name = "{name}"

[input]
uri = "s3://bench/in/*.parquet"

[model]
uri = "s3://bench/model.onnx"

[model.inputs]
x = "features"

[model.outputs]
logits = "logits"

[output]
uri = "{out}"
passthrough = ["id"]
"#
    ))?)
}

/// `shards` shards of `rows` rows each, spread over `PLAN_FILES` files.
pub fn stand_in_plan(shards: usize, rows: u64) -> JobPlan {
    let files = (0..PLAN_FILES)
        .map(|i| InputFile {
            uri: format!("s3://bench/in/{i:02}.parquet"),
            size: 1 << 20,
            etag: Some(format!("\"etag-{i}\"")),
        })
        .collect();
    let shards: Vec<ShardPlan> = (0..shards)
        .map(|i| {
            let group = (i / PLAN_FILES) as u32;
            ShardPlan {
                file_index: (i % PLAN_FILES) as u32,
                row_group_start: group,
                row_group_end: group + 1,
                file_row_start: u64::from(group) * rows,
                rows,
            }
        })
        .collect();
    JobPlan {
        rows_total: shards.len() as u64 * rows,
        files,
        shards,
    }
}

/// PostgreSQL with `pg_stat_statements`, one database holding a running job of stand-in shards,
/// and a `nightshift coordinator` process over it.
pub struct LoadRig {
    pub coordinator: CoordinatorProc,
    pub database_url: String,
    pub job_id: i64,
    /// The stand-in parts' one body, beside the job's output (see `link_part`).
    pub part_body: PathBuf,
    // The coordinator stops before the server and the directories go.
    pub pg: PgServer,
    _dir: tempfile::TempDir,
}

/// Database-side counts at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct DbCounters {
    /// Statements executed (`pg_stat_statements`, this database).
    pub statements: i64,
    /// Transactions committed or rolled back.
    pub transactions: i64,
}

impl LoadRig {
    /// Starts it all; `durable` keeps PostgreSQL's default fsync and commit settings.
    pub async fn start(bin: &Path, shards: usize, rows: u64, durable: bool) -> Result<Self> {
        let mut settings = vec!["shared_preload_libraries=pg_stat_statements"];
        if !durable {
            settings.extend_from_slice(PgServer::test_settings());
        }
        let pg = PgServer::start_with(&settings).await?;
        let database_url = pg.fresh_database().await?;
        let store = PgStore::connect(&database_url).await?;
        store.migrate().await?;
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("out");
        let part_body = dir.path().join("stand-in-part");
        std::fs::write(&part_body, STAND_IN_BODY)?;
        let job_id = store
            .create_job(NewJob {
                uid: uuid_like(),
                spec: stand_in_spec("load", &out.display().to_string())?,
                idempotency_key: None,
                plan: stand_in_plan(shards, rows),
                queued: false,
                planning: false,
            })
            .await?
            .job()
            .id;
        let mut conn = sqlx::postgres::PgConnection::connect(&database_url).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
        let allow = format!("{}/", dir.path().display());
        let coordinator = CoordinatorProc::start(
            bin,
            dir.path(),
            "coordinator",
            &database_url,
            // No speculative copies: a copy's loser loses its lease by design, and here a lost
            // lease must mean the coordinator was too slow.
            &["--allow-uri", &allow, "--speculate-max-left", "0"],
            &[],
        );
        Ok(Self {
            coordinator,
            database_url,
            job_id,
            part_body,
            pg,
            _dir: dir,
        })
    }

    pub async fn db_counters(&self) -> Result<DbCounters> {
        let mut conn = sqlx::postgres::PgConnection::connect(&self.database_url).await?;
        let statements: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut conn)
        .await?;
        let transactions: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(DbCounters {
            statements,
            transactions,
        })
    }

    /// The `n` statements that took the most database time: (calls, total ms, query).
    pub async fn top_statements(&self, n: i64) -> Result<Vec<(i64, f64, String)>> {
        let mut conn = sqlx::postgres::PgConnection::connect(&self.database_url).await?;
        let rows: Vec<(i64, f64, String)> = sqlx::query_as(
            "SELECT calls, total_exec_time, query FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT $1",
        )
        .bind(n)
        .fetch_all(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(rows)
    }

    /// Grants of the job beyond each shard's first: re-grants after a lease expired or was
    /// released.
    pub async fn regrants(&self) -> Result<i64> {
        let mut conn = sqlx::postgres::PgConnection::connect(&self.database_url).await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(attempts - 1), 0)::bigint FROM shards \
             WHERE job_id = $1 AND attempts > 1",
        )
        .bind(self.job_id)
        .fetch_one(&mut conn)
        .await?;
        conn.close().await.ok();
        Ok(n)
    }

    /// The coordinator process's peak resident memory (VmHWM), in bytes.
    pub fn coordinator_peak_rss(&self) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.coordinator.child.id()))
                .ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// The coordinator process's CPU seconds so far (user + system).
    pub fn coordinator_cpu_secs(&self) -> Option<f64> {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.coordinator.child.id())).ok()?;
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / CLOCK_TICKS_PER_SEC)
    }
}

/// A random 16-hex-character job uid.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:016x}",
        (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
    )
}

/// The report, as the bench and the test print it.
pub fn print_report(plan: &LoadPlan, r: &LoadReport, secs: f64) {
    println!(
        "{} workers x {} slots, heartbeat {:?}, checkpoint {:?}, {} rows a shard, {:.1} s",
        plan.workers,
        plan.slots,
        plan.heartbeat_every,
        plan.checkpoint_every,
        plan.checkpoints_per_shard,
        secs
    );
    println!(
        "{:<11} {:>9} {:>9} {:>9} {:>9}",
        "endpoint", "calls", "p50 ms", "p99 ms", "max ms"
    );
    for (name, l) in &r.latency {
        println!(
            "{name:<11} {:>9} {:>9.2} {:>9.2} {:>9.2}",
            l.calls, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    println!(
        "claims/s {:.1} (granting {:.1} shards/s); shards completed {}, released {}; leases lost {}; errors {}",
        r.claims as f64 / secs,
        r.shards_granted as f64 / secs,
        r.shards_completed,
        r.shards_released,
        r.leases_lost,
        r.errors
    );
    for e in &r.first_errors {
        println!("  error: {e}");
    }
}
