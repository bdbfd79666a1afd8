//! Preemption: a worker under a metadata server that announces a spot interruption mid-shard
//! finishes what is in flight, checkpoints, releases with its progress and exits 0 in time; the
//! next worker recomputes nothing. SIGTERM means the same.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::PgServer;
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc, paced, rows_inferred};
use nightshift_tests::fixtures::{Fixture, spec_toml};
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

/// Runs a slow job with one worker, preempts it with `preempt` at a shard's first checkpoint,
/// and lets a second worker finish.
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
        // The first worker is paced (see `first` below), so the model's width does not matter.
        &["--hidden", "256"],
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
    // At most 3,333 rows/s (150 ms a 500-row batch), whatever the load: the shard stays at its
    // first checkpoint for over a second, and a notice sent then reaches the worker (polled
    // every 200 ms) seconds before the shard's end. Unpaced, a model 1,536 wide ran the rest of
    // a shard within that time, and a model 4,096 wide left the test a 0.4 s window to see the
    // first checkpoint.
    let mut first = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "first",
        &c.url(),
        &extra,
        &[debug[0].clone(), paced(150)],
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
        .any(|s| s.1 == "leased" && s.3 > 0 && s.3 <= 4_000)
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

/// Merge shards as (id, state, token).
fn merges(url: &str) -> Vec<(i64, String, i64)> {
    let out = run_script(
        "query_postgres.py",
        &[
            url,
            "SELECT id, state, token FROM shards WHERE kind = 'merge' ORDER BY id",
        ],
    );
    serde_json::from_str(out.trim()).unwrap_or_default()
}

/// The first merge shard a worker's log says it leased, if any.
fn merge_leased(log: &str) -> Option<i64> {
    log.lines().find_map(|line| {
        let (_, fields) = line.split_once("shard leased ")?;
        if !fields.contains("kind=\"merge\"") && !fields.contains("kind=merge") {
            return None;
        }
        let (_, after) = fields.split_once(" shard=")?;
        after.split(' ').next()?.parse().ok()
    })
}

#[test]
fn a_worker_killed_mid_merge_leaves_nothing_and_the_merge_is_redone() {
    let f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(PgServer::start()).unwrap();
    let url = rt.block_on(pg.fresh_database()).unwrap();
    // Parts of ~1 MB (the features pass through), merged toward 4 MB files.
    let rows: u64 = 48_000;
    let data = f.data(
        "in",
        &[
            "--rows",
            &rows.to_string(),
            "--files",
            "4",
            "--row-group-rows",
            "2000",
            "--dim",
            "64",
        ],
    );
    let model = f.model("m.onnx", &["--hidden", "16", "--dim", "64"]);
    let input = format!("{}/*.parquet", data.display());
    let out = f.path("out");
    let toml = spec_toml(
        "merge-kill",
        &input,
        &model,
        &out,
        "[shards]\nrows = 4000\ncheckpoint_rows = 4000\n",
    )
    .replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\", \"features\"]\ntarget_file_mb = 4",
    );
    let spec = f.spec("job.toml", &toml);
    let allow = f.allow_uri();
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coord",
        &url,
        &["--allow-uri", &allow, "--lease-ttl", "2s"],
        &[],
    );
    let start = |id: &str| {
        WorkerProc::start(
            Path::new(BIN),
            f.dir.path(),
            id,
            &c.url(),
            &["--spot-metadata", "off"],
            &[(
                "RUST_LOG".to_string(),
                "warn,nightshift_worker=info".to_string(),
            )],
        )
    };
    let mut submit = nightshift(Path::new(BIN));
    submit
        .args(["submit"])
        .arg(&spec)
        .args(["--coordinator", &c.url(), "--token", SUBMIT_TOKEN]);
    let mut worker = start("w0");
    assert!(run(submit, Duration::from_secs(60)).status.success());
    // SIGKILL a worker the moment its log shows a merge lease; keep the kills that caught the
    // merge unfinished (its shard still leased), until one has, or the merges run out.
    let mut killed: Vec<(i64, i64)> = Vec::new();
    let mut logs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut checked = Instant::now();
    while killed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no merge caught: {}",
            worker.log_text()
        );
        let log = worker.log_text();
        let Some(shard) = merge_leased(&log) else {
            if checked.elapsed() > Duration::from_secs(1) {
                let now = merges(&url);
                let rows_done = shards(&url).iter().all(|s| s.1 == "done");
                let all_merged = !now.is_empty() && now.iter().all(|m| m.1 == "done");
                assert!(
                    !(rows_done && all_merged) || merge_leased(&worker.log_text()).is_some(),
                    "every merge finished before one was caught: {}",
                    worker.log_text()
                );
                checked = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        worker.child.kill();
        let state = merges(&url).into_iter().find(|m| m.0 == shard);
        if let Some((id, state, token)) = state.filter(|m| m.1 == "leased") {
            eprintln!("killed mid-merge: shard {id} ({state}, token {token})");
            killed.push((id, token));
        }
        logs.push(worker.log.clone());
        worker = start(&format!("w{}", logs.len()));
    }
    let mut watch = nightshift(Path::new(BIN));
    watch.args([
        "watch",
        "merge-kill",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let w = run(watch, Duration::from_secs(300));
    assert!(w.status.success(), "{}", worker.log_text());
    // The merge was done again under a newer lease; the output is exact and its files are the
    // merged ones, the killed attempt's upload nowhere in it.
    let (shard, token) = killed[0];
    let redone = merges(&url).into_iter().find(|m| m.0 == shard).unwrap();
    assert_eq!(redone.1, "done", "{redone:?}");
    assert!(
        redone.2 > token,
        "merged again under a newer token: {redone:?}"
    );
    verify_output(out.to_str().unwrap(), &input, &model, 0, &[]).assert_exact(&[]);
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    eprintln!("output: {files:?}");
    assert!(
        !files
            .iter()
            .any(|n| n.starts_with("_parts") || n.contains("tmp") || n.contains('#')),
        "no part, upload or staging file of any attempt is left: {files:?}"
    );
    let files: Vec<_> = files.iter().filter(|n| n.ends_with(".parquet")).collect();
    assert!(
        files.len() < (rows / 4000) as usize,
        "merged files, not one per shard: {files:?}"
    );
    let _ = c;
}
