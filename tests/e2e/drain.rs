//! Preemption: a worker under a metadata server that announces a spot interruption mid-shard
//! finishes what is in flight, checkpoints, releases with its progress and exits 0 in time; the
//! next worker recomputes nothing. SIGTERM means the same.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::PgServer;
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc, rows_inferred};
use nightshift_tests::fixtures::Fixture;
use nightshift_tests::imds::MetadataServer;
use nightshift_tests::process::{nightshift, run};
use nightshift_tests::python::run_script;
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
const ROWS: u64 = 32_000;

fn shards(url: &str) -> Vec<(i64, String, i64, i64, Option<String>)> {
    let out = run_script(
        "query_postgres.py",
        &[
            url,
            "SELECT id, state, token, checkpoint_rows, worker_id FROM shards WHERE kind = 'rows' ORDER BY id",
        ],
    );
    serde_json::from_str(out.trim()).unwrap_or_default()
}

/// Runs a slow job with one worker, preempts it with `preempt` once it is past its first
/// checkpoint, and lets a second worker finish.
fn preempted(preempt: impl FnOnce(&mut WorkerProc), spot: Option<&str>, name: &str) {
    let f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(PgServer::start()).unwrap();
    let url = rt.block_on(pg.fresh_database()).unwrap();
    let job = f.job(
        name,
        &[
            "--rows",
            &ROWS.to_string(),
            "--files",
            "2",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "1536"],
        "[batch]\nsize = 500\n[shards]\nrows = 16000\ncheckpoint_rows = 4000\n",
    );
    let allow = f.allow_uri();
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coord",
        &url,
        &["--allow-uri", &allow, "--lease-ttl", "30s"],
        &[],
    );
    let debug = [(
        "RUST_LOG".to_string(),
        "warn,nightshift_worker=debug".to_string(),
    )];
    let mut extra = vec!["--drain-timeout", "20s", "--spot-poll", "200ms"];
    if let Some(endpoint) = spot {
        extra.extend(["--spot-metadata", endpoint]);
    } else {
        extra.extend(["--spot-metadata", "off"]);
    }
    let mut first = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "first",
        &c.url(),
        &extra,
        &debug,
    );
    let mut submit = nightshift(Path::new(BIN));
    submit.args(["submit"]).arg(&job.spec).args([
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    assert!(run(submit, Duration::from_secs(60)).status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !shards(&url)
        .iter()
        .any(|s| s.1 == "leased" && s.3 > 0 && s.3 < 12_000)
    {
        assert!(
            Instant::now() < deadline,
            "no progress: {}",
            first.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let told = Instant::now();
    preempt(&mut first);
    let status = first
        .child
        .wait_for(Duration::from_secs(25))
        .expect("the worker exits within its drain timeout");
    let took = told.elapsed();
    assert!(status.success(), "exit {status}: {}", first.log_text());
    let log = first.log_text();
    assert!(log.contains("shard released"), "{log}");
    // Released with progress: pending again, checkpoint kept past the first part.
    let after = shards(&url);
    let released: Vec<_> = after
        .iter()
        .filter(|s| s.1 == "pending" && s.3 > 0)
        .collect();
    assert!(
        !released.is_empty(),
        "no shard released with progress: {after:?}"
    );
    assert!(after.iter().all(|s| s.1 != "leased"), "{after:?}");

    let second = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "second",
        &c.url(),
        &["--spot-metadata", "off"],
        &debug,
    );
    let mut watch = nightshift(Path::new(BIN));
    watch.args([
        "watch",
        name,
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let w = run(watch, Duration::from_secs(300));
    assert!(w.status.success(), "{}", second.log_text());
    let inferred = rows_inferred(&[first.log.clone(), second.log.clone()]);
    eprintln!(
        "{name}: drained and exited {took:?} after the notice; rows inferred {inferred} for {ROWS} rows (recomputed {})",
        inferred.saturating_sub(ROWS)
    );
    assert_eq!(inferred, ROWS, "a drained shard must not be recomputed");
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 1000, &[]).assert_exact(&[]);
}

#[test]
fn a_spot_notice_drains_the_worker_and_nothing_is_recomputed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let imds = rt.block_on(MetadataServer::start());
    let endpoint = imds.url.clone();
    preempted(|_| imds.announce(), Some(&endpoint), "spot");
    assert!(imds.polls() > 0);
}

#[test]
fn sigterm_drains_the_worker_the_same_way() {
    preempted(|w| w.child.signal("TERM"), None, "sigterm");
}
