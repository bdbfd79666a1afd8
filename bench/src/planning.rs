//! Background planning of a job over many small input files: how long `submit` takes to
//! answer, how soon a worker leases the first shard, when planning ends, and whether the plan
//! is exact. The bench writes `--files` small Parquet files (file `i` holds `1 + i % R` rows,
//! R = `--rows-per-file`), starts a `nightshift coordinator` process, has one simulated worker
//! ask for a shard through the real worker API (`POST /v1/worker/lease` with the worker token)
//! every few milliseconds, submits the job through the real API (`POST /v1/jobs` with the
//! submit token) and watches it (`GET /v1/jobs/{id}`) until it is no longer `planning`. The
//! simulated worker never completes its shard: its lease just expires. Two setups, both by
//! default:
//!
//! - SQLite metastore, input on local files (`--files`, 100,000 by default);
//! - PostgreSQL metastore (default durability), input on the local S3 server (moto), with
//!   fewer files (`--s3-files`, 20,000 by default): moto takes every object one request at a
//!   time, so uploads and footer reads are far slower than on S3.
//!
//!   cargo build --release -p nightshift && \
//!   cargo run --release -p nightshift-bench -- planning
//!
//! Exits non-zero when the job's `rows_total` after planning is not the sum of the rows the
//! bench wrote (or its shards are not one per file, each file being one row group).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{FixedSizeListArray, Float32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use nightshift_coordinator::service::INLINE_PLAN_FILES;
use nightshift_proto::JobState;
use nightshift_proto::wire::{JobView, SubmitResponse};
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WORKER_TOKEN};
use nightshift_tests::fixtures::spec_toml;
use nightshift_tests::{PgServer, S3Server};
use nightshift_worker::client::CoordinatorClient;
use parquet::arrow::ArrowWriter;

use crate::pipeline::python;

/// Features per row, and the stand-in model's widths (the model is never run).
const DIM: usize = 8;
const MODEL_HIDDEN: &str = "8";
const MODEL_CLASSES: &str = "4";
/// Local files written at once (blocking tasks), and objects put at once on the S3 server.
const LOCAL_WRITE_CONCURRENCY: usize = 16;
const S3_PUT_CONCURRENCY: usize = 64;
/// How much a feature grows from one value to the next (the values do not matter).
const FEATURE_STEP: f32 = 0.001;
const BUCKET: &str = "bench-planning";
/// The local input's directory, in the bench's temporary directory.
const LOCAL_INPUT: &str = "local-in";
/// How often the simulated worker asks for a shard, and how often the job is looked at.
const CLAIM_POLL: Duration = Duration::from_millis(25);
const STATUS_POLL: Duration = Duration::from_millis(50);
/// How long writing or uploading the input may take, and planning it.
const WRITE_DEADLINE: Duration = Duration::from_secs(30 * 60);
const PLANNING_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// How long the first lease may still take once planning has ended.
const LEASE_AFTER_PLANNING: Duration = Duration::from_secs(30);
/// One API call's limit.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const WORKER_ID: &str = "bench-planning-w";
const KIB: u64 = 1024;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(clap::Args)]
pub struct Args {
    /// Input files of the local-files job.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Input files of the S3 job (moto is slow: fewer than `--files`).
    #[arg(long, default_value_t = 20_000)]
    s3_files: usize,
    /// The most rows a file holds: file `i` holds `1 + i % R`.
    #[arg(long, default_value_t = 7)]
    rows_per_file: u64,
    /// Skip SQLite + local files.
    #[arg(long)]
    no_local: bool,
    /// Skip PostgreSQL + the local S3 server.
    #[arg(long)]
    no_s3: bool,
    /// The `nightshift` binary that serves as coordinator.
    #[arg(long, default_value = "target/release/nightshift")]
    bin: PathBuf,
}

/// The input a setup wrote.
struct Written {
    files: usize,
    rows: u64,
    secs: f64,
}

/// What one setup measured.
struct Outcome {
    setup: &'static str,
    input: Written,
    submit_ms: f64,
    /// None: no shard was leased in time.
    first_lease_ms: Option<f64>,
    /// Files planned when the job was first seen with a leased (or done) shard.
    planned_at_lease: Option<u64>,
    planning_ms: f64,
    view: JobView,
    idle_rss: Option<u64>,
    peak_rss: Option<u64>,
}

impl Outcome {
    fn exact(&self) -> bool {
        self.view.rows_total == self.input.rows
            && self.view.shards.total() == self.input.files as u64
    }

    fn lease_before_end(&self) -> bool {
        self.first_lease_ms.is_some_and(|ms| ms < self.planning_ms)
    }
}

/// Where a setup's input, model and output are, and its coordinator.
struct Rig {
    coordinator: CoordinatorProc,
    spec: String,
}

pub async fn run(a: Args) -> Result<()> {
    check_args(&a)?;
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("m.onnx");
    let m = model.to_str().unwrap_or_default();
    let dim = DIM.to_string();
    python(&[
        "gen_model.py",
        "--out",
        m,
        "--dim",
        &dim,
        "--hidden",
        MODEL_HIDDEN,
        "--classes",
        MODEL_CLASSES,
    ])?;
    let mut outcomes = Vec::new();
    if !a.no_local {
        outcomes.push(local(&a, tmp.path(), &model).await?);
    }
    if !a.no_s3 {
        outcomes.push(on_s3(&a, tmp.path(), &model).await?);
    }
    print_table(&outcomes);
    if outcomes.iter().any(|o| !o.exact()) {
        bail!("a plan was not exact: see MISMATCH above");
    }
    Ok(())
}

fn check_args(a: &Args) -> Result<()> {
    let smallest = if a.no_local { usize::MAX } else { a.files };
    let smallest = smallest.min(if a.no_s3 { usize::MAX } else { a.s3_files });
    if smallest <= INLINE_PLAN_FILES {
        bail!("--files and --s3-files must exceed {INLINE_PLAN_FILES} (what submit plans inline)");
    }
    if a.rows_per_file == 0 {
        bail!("--rows-per-file must be at least 1");
    }
    if !a.bin.exists() {
        bail!(
            "no coordinator binary at `{}`: build it (cargo build --release -p nightshift) or pass --bin",
            a.bin.display()
        );
    }
    Ok(())
}

/// SQLite metastore, input on local files.
async fn local(a: &Args, dir: &Path, model: &Path) -> Result<Outcome> {
    let input_dir = dir.join(LOCAL_INPUT);
    let write = write_local(&input_dir, a.files, a.rows_per_file);
    let input = timed("local files", a.files, write).await?;
    let db = format!("sqlite://{}", dir.join("local.sqlite").display());
    let allow = dir.display().to_string();
    let glob = format!("{}/*.parquet", input_dir.display());
    let rig = Rig {
        coordinator: CoordinatorProc::start(
            &a.bin,
            dir,
            "coord-local",
            &db,
            &["--allow-uri", &allow],
            &[],
        ),
        spec: spec_toml("planning-local", &glob, model, &dir.join("local-out"), ""),
    };
    measure("sqlite + local files", &rig, input).await
}

/// PostgreSQL metastore, input (and model and output) on the local S3 server.
async fn on_s3(a: &Args, dir: &Path, model: &Path) -> Result<Outcome> {
    let s3 = S3Server::start().await?;
    s3.create_bucket(BUCKET).await?;
    s3.put(&s3_uri("m.onnx"), std::fs::read(model)?).await?;
    let prefix = s3_uri("in");
    let upload = upload(&s3, &prefix, a.s3_files, a.rows_per_file);
    let input = timed("local S3 server (moto)", a.s3_files, upload).await?;
    let pg = PgServer::start_durable().await?;
    let rig = s3_rig(a, dir, &s3, &pg.fresh_database().await?);
    let outcome = measure("postgres + local S3", &rig, input).await;
    // The coordinator stops before PostgreSQL and moto do.
    drop(rig);
    outcome
}

/// A coordinator over the PostgreSQL database `db` that reaches `s3`, and the job's spec.
fn s3_rig(a: &Args, dir: &Path, s3: &S3Server, db: &str) -> Rig {
    let envs: Vec<(String, String)> = s3
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let allow = format!("s3://{BUCKET}/");
    Rig {
        coordinator: CoordinatorProc::start(
            &a.bin,
            dir,
            "coord-s3",
            db,
            &["--allow-uri", &allow],
            &envs,
        ),
        spec: spec_toml(
            "planning-s3",
            &s3_uri("in/*.parquet"),
            Path::new(&s3_uri("m.onnx")),
            Path::new(&s3_uri("out/")),
            "",
        ),
    }
}

/// `s3://BUCKET/planning/{key}`.
fn s3_uri(key: &str) -> String {
    format!("s3://{BUCKET}/planning/{key}")
}

/// Runs `write` (which answers the rows it wrote) within `WRITE_DEADLINE`; prints and answers
/// what it wrote and how long it took.
async fn timed(
    place: &str,
    files: usize,
    write: impl std::future::Future<Output = Result<u64>>,
) -> Result<Written> {
    let began = Instant::now();
    let rows = deadline(WRITE_DEADLINE, "writing the input", write).await?;
    let secs = began.elapsed().as_secs_f64();
    println!(
        "{place}: wrote {files} files, {rows} rows in {secs:.1} s ({:.0} files/s)",
        files as f64 / secs
    );
    Ok(Written { files, rows, secs })
}

/// `fut`, or an error naming `what` once `limit` has passed.
async fn deadline<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .with_context(|| format!("{what} took more than {limit:?}"))?
}

/// Rows of input file `i`.
fn file_rows(i: usize, most: u64) -> u64 {
    1 + i as u64 % most
}

fn file_name(i: usize) -> String {
    format!("part-{i:06}.parquet")
}

/// Input file `i` as Parquet: `id` int64 and `features` (`DIM` float32 a row), one row group.
fn parquet_bytes(i: usize, most: u64) -> Result<(Bytes, u64)> {
    let rows = file_rows(i, most);
    let first_id = i as i64 * most as i64;
    let ids = Int64Array::from_iter_values((0..rows as i64).map(|k| first_id + k));
    let values = Float32Array::from_iter_values(
        (0..rows as usize * DIM).map(|v| (i + v) as f32 * FEATURE_STEP),
    );
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let width = DIM as i32;
    let features = FixedSizeListArray::try_new(item.clone(), width, Arc::new(values), None)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("features", DataType::FixedSizeList(item, width), false),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(features)])?;
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, schema, None)?;
    writer.write(&batch)?;
    writer.close()?;
    Ok((Bytes::from(buf), rows))
}

/// Writes `files` input files into `dir`; answers the rows written.
async fn write_local(dir: &Path, files: usize, most: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    futures::stream::iter(0..files)
        .map(|i| {
            let path = dir.join(file_name(i));
            tokio::task::spawn_blocking(move || -> Result<u64> {
                let (bytes, rows) = parquet_bytes(i, most)?;
                std::fs::write(&path, bytes)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(rows)
            })
        })
        .buffer_unordered(LOCAL_WRITE_CONCURRENCY)
        .map(|joined| joined.context("a writer panicked")?)
        .try_fold(0, |sum, rows| async move { Ok(sum + rows) })
        .await
}

/// Puts `files` input files under `prefix` on the S3 server; answers the rows written.
async fn upload(s3: &S3Server, prefix: &str, files: usize, most: u64) -> Result<u64> {
    futures::stream::iter(0..files)
        .map(|i| async move {
            let (bytes, rows) = parquet_bytes(i, most)?;
            s3.put(&format!("{prefix}/{}", file_name(i)), bytes).await?;
            Ok::<_, anyhow::Error>(rows)
        })
        .buffer_unordered(S3_PUT_CONCURRENCY)
        .try_fold(0, |sum, rows| async move { Ok(sum + rows) })
        .await
}

/// Submits the rig's job with a simulated worker asking for shards meanwhile, and watches it
/// until planning ends.
async fn measure(setup: &'static str, rig: &Rig, input: Written) -> Result<Outcome> {
    let c = &rig.coordinator;
    let pid = c.child.id();
    let idle_rss = proc_status_bytes(pid, "VmRSS:");
    let http = reqwest::Client::builder().timeout(CALL_TIMEOUT).build()?;
    let start = Instant::now();
    let mut claimer = tokio::spawn(first_lease(c.url(), start));
    let watched = submit_and_watch(&http, rig, start).await;
    let (submit_ms, planning_ms, watched) = match watched {
        Ok(w) => w,
        Err(e) => {
            claimer.abort();
            return Err(e);
        }
    };
    let first_lease_ms = match tokio::time::timeout(LEASE_AFTER_PLANNING, &mut claimer).await {
        Ok(joined) => joined.context("the simulated worker panicked")??.map(ms),
        Err(_) => {
            claimer.abort();
            None
        }
    };
    Ok(Outcome {
        setup,
        input,
        submit_ms,
        first_lease_ms,
        planned_at_lease: watched.planned_at_lease,
        planning_ms,
        view: watched.last,
        idle_rss,
        peak_rss: proc_status_bytes(pid, "VmHWM:"),
    })
}

/// Submits the rig's job and watches it until planning ends; answers the milliseconds from
/// `start` to submit's answer and to the end of planning, and what watching saw.
async fn submit_and_watch(
    http: &reqwest::Client,
    rig: &Rig,
    start: Instant,
) -> Result<(f64, f64, Watched)> {
    let c = &rig.coordinator;
    let submitted = submit(http, &c.url(), &rig.spec).await;
    let submit_ms = ms(start.elapsed());
    let job = submitted?.job;
    if job.state != JobState::Planning {
        println!(
            "note: job {} answered `{}`, not `planning`",
            job.id, job.state
        );
    }
    let watched = watch(http, c, job.id).await?;
    Ok((submit_ms, ms(start.elapsed()), watched))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One simulated worker asking for a shard until it gets one; answers when (from `start`).
async fn first_lease(base: String, start: Instant) -> Result<Option<Duration>> {
    let client = CoordinatorClient::new(&base, WORKER_TOKEN).for_worker(WORKER_ID);
    while start.elapsed() < PLANNING_DEADLINE + LEASE_AFTER_PLANNING {
        let granted = client.lease(WORKER_ID, 1).await?;
        if !granted.leases.is_empty() {
            return Ok(Some(start.elapsed()));
        }
        tokio::time::sleep(CLAIM_POLL).await;
    }
    Ok(None)
}

/// `POST /v1/jobs` of a TOML spec.
async fn submit(http: &reqwest::Client, base: &str, spec: &str) -> Result<SubmitResponse> {
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(SUBMIT_TOKEN)
        .header("content-type", "application/toml")
        .body(spec.to_string())
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("submit answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// `GET /v1/jobs/{id}`.
async fn status(http: &reqwest::Client, base: &str, job: i64) -> Result<JobView> {
    let resp = http
        .get(format!("{base}/v1/jobs/{job}"))
        .bearer_auth(SUBMIT_TOKEN)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("job {job}: status answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// What watching a job saw.
struct Watched {
    /// Its view once it was no longer planning.
    last: JobView,
    planned_at_lease: Option<u64>,
}

/// Looks at the job until it is no longer planning (failing if it failed, or past the
/// deadline), noting how far planning had come when a shard was first seen leased.
async fn watch(http: &reqwest::Client, c: &CoordinatorProc, job: i64) -> Result<Watched> {
    let began = Instant::now();
    let mut planned_at_lease = None;
    loop {
        let view = status(http, &c.url(), job).await?;
        let leased = view.shards.leased + view.shards.done > 0;
        if leased && planned_at_lease.is_none() {
            planned_at_lease = Some(view.planning.as_ref().map_or(0, |p| p.files_planned));
        }
        if view.state == JobState::Failed {
            bail!("job {job} failed: {:?}", view.error);
        }
        if view.state != JobState::Planning {
            return Ok(Watched {
                last: view,
                planned_at_lease,
            });
        }
        if began.elapsed() > PLANNING_DEADLINE {
            bail!(
                "job {job} still planning after {PLANNING_DEADLINE:?} ({:?}); coordinator log {}",
                view.planning,
                c.log.display()
            );
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// A field of `/proc/PID/status` given in kB (`VmRSS:`, `VmHWM:`), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * KIB)
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "\n{:<22} {:>7} {:>8} {:>8} {:>10} {:>13} {:>14} {:>12} {:>10} {:>17}",
        "setup",
        "files",
        "rows",
        "write s",
        "submit ms",
        "1st lease ms",
        "planned@lease",
        "planning ms",
        "plan",
        "RSS idle/peak MiB"
    );
    for o in outcomes {
        print_row(o);
    }
    for o in outcomes.iter().filter(|o| !o.lease_before_end()) {
        println!(
            "note: {}: the first lease did not come before planning ended",
            o.setup
        );
    }
    for o in outcomes.iter().filter(|o| !o.exact()) {
        println!(
            "MISMATCH {}: rows_total {} (wrote {}), shards {} (files {})",
            o.setup,
            o.view.rows_total,
            o.input.rows,
            o.view.shards.total(),
            o.input.files
        );
    }
}

fn print_row(o: &Outcome) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mib = |b: Option<u64>| opt(b.map(|b| format!("{:.0}", b as f64 / MIB)));
    println!(
        "{:<22} {:>7} {:>8} {:>8.1} {:>10.1} {:>13} {:>14} {:>12.0} {:>10} {:>17}",
        o.setup,
        o.input.files,
        o.input.rows,
        o.input.secs,
        o.submit_ms,
        opt(o.first_lease_ms.map(|v| format!("{v:.0}"))),
        opt(o.planned_at_lease.map(|v| v.to_string())),
        o.planning_ms,
        if o.exact() { "OK" } else { "MISMATCH" },
        format!("{} / {}", mib(o.idle_rss), mib(o.peak_rss)),
    );
}
