//! A real cluster: PostgreSQL, coordinator replicas and worker processes, driven through the
//! CLI. Output is checked by the independent verifier.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::{
    self, CoordinatorProc, SUBMIT_TOKEN, WORKER_TOKEN, WorkerProc, paced, rows_inferred,
};
use nightshift_tests::fixtures::Fixture;
use nightshift_tests::postgres::server_with_database;
use nightshift_tests::process::{SCHED_BATCH, SCHED_OTHER, nightshift, output_text, run};
use nightshift_tests::python::run_script;
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

fn submit(f: &Fixture, coordinator: &str, spec: &Path, extra: &[&str]) -> std::process::Output {
    let auth = ["--token", SUBMIT_TOKEN];
    cluster::submit(
        Path::new(BIN),
        f.dir.path(),
        coordinator,
        spec,
        &auth,
        extra,
    )
}

/// A coordinator on `url`, allowed the fixture's directory, with `extra` flags.
fn coordinator(f: &Fixture, url: &str, name: &str, extra: &[&str]) -> CoordinatorProc {
    let allow = f.allow_uri();
    let mut args = vec!["--allow-uri", allow.as_str()];
    args.extend_from_slice(extra);
    CoordinatorProc::start(Path::new(BIN), f.dir.path(), name, url, &args, &[])
}

/// `nightshift ARGS` against coordinator `c` with the submit token.
fn api_cli(c: &CoordinatorProc, args: &[&str]) -> std::process::Output {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args(args)
        .args(["--coordinator", &c.url(), "--token", SUBMIT_TOKEN]);
    run(cmd, Duration::from_secs(30))
}

/// Shards as (id, state, token, checkpoint_rows, worker_id).
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

#[test]
fn two_coordinators_three_workers_exact_output() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = f.job(
        "cluster",
        &[
            "--rows",
            "20000",
            "--files",
            "4",
            "--row-group-rows",
            "1000",
            "--codecs",
            "zstd,snappy",
        ],
        &["--hidden", "64"],
        "[batch]\nsize = 500\n[shards]\nrows = 2000\ncheckpoint_rows = 1000\n",
    );
    let a = coordinator(&f, &url, "coord-a", &[]);
    let b = coordinator(&f, &url, "coord-b", &[]);
    let workers = [
        WorkerProc::start(Path::new(BIN), f.dir.path(), "w1", &a.url(), &[], &[]),
        WorkerProc::start(Path::new(BIN), f.dir.path(), "w2", &a.url(), &[], &[]),
        WorkerProc::start(Path::new(BIN), f.dir.path(), "w3", &b.url(), &[], &[]),
    ];
    let o = submit(
        &f,
        &b.url(),
        &job.spec,
        &["--idempotency-key", "cluster-1", "--wait", "--json"],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        output_text(&o),
        workers
            .iter()
            .map(|w| w.log_text())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Workers run the pipeline as throughput work (`SCHED_BATCH`); coordinators answer
    // requests under the default policy.
    assert_eq!(a.child.sched_policy(), Some(SCHED_OTHER));
    for w in &workers {
        assert_eq!(w.child.sched_policy(), Some(SCHED_BATCH), "{}", w.id);
    }
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
    // Every worker took part, through both replicas.
    let done: Vec<_> = shards(&url);
    assert!(done.iter().all(|s| s.1 == "done"));
    // The same key and spec again: the same job, nothing new.
    let again = submit(
        &f,
        &a.url(),
        &job.spec,
        &["--idempotency-key", "cluster-1", "--json"],
    );
    assert!(again.status.success(), "{}", output_text(&again));
    let resp: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&again.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(resp["created"], false);
    assert_eq!(resp["job"]["state"], "succeeded");
    // `jobs` lists it, `status` shows it.
    let mut jobs = nightshift(Path::new(BIN));
    jobs.args([
        "jobs",
        "--json",
        "--coordinator",
        &a.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let list: serde_json::Value =
        serde_json::from_slice(&run(jobs, Duration::from_secs(30)).stdout).unwrap();
    assert_eq!(list["jobs"][0]["name"], "cluster");
    assert_eq!(list["jobs"][0]["rows_done"], 20000);
    let mut status = nightshift(Path::new(BIN));
    status.args([
        "status",
        "cluster",
        "--coordinator",
        &b.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let o = run(status, Duration::from_secs(30));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("succeeded"),
        "{}",
        output_text(&o)
    );
}

#[test]
fn a_worker_killed_mid_shard_costs_at_most_one_checkpoint_interval() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let (batch, checkpoint) = (500u64, 2000u64);
    let job = f.job(
        "kill",
        &["--rows", "32000", "--files", "2", "--row-group-rows", "2000"],
        &["--hidden", "256"],
        &format!("[batch]\nsize = {batch}\n[shards]\nrows = 16000\ncheckpoint_rows = {checkpoint}\n[retry]\nmax_attempts = 10\n"),
    );
    let c = coordinator(
        &f,
        &url,
        "coord",
        &["--lease-ttl", "2s", "--retry-backoff", "100ms"],
    );
    let debug = [(
        "RUST_LOG".to_string(),
        "warn,nightshift_worker=debug".to_string(),
    )];
    // The victim runs at 5,000 rows/s at most (100 ms a 500-row batch), so a shard stays
    // between its first checkpoints for over a second: at full speed a shard ran that stretch
    // in a tenth of one, as fast as the test polls.
    let mut victim = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "victim",
        &c.url(),
        &[],
        &[debug[0].clone(), paced(100)],
    );
    let o = submit(&f, &c.url(), &job.spec, &[]);
    assert!(o.status.success(), "{}", output_text(&o));
    // Kill the victim once it has committed part of a shard and is past that checkpoint.
    let deadline = Instant::now() + Duration::from_secs(120);
    let held = loop {
        let s = shards(&url);
        // Early in a shard, so the victim cannot finish it before the kill lands.
        if let Some(x) = s
            .iter()
            .find(|x| x.1 == "leased" && x.3 > 0 && x.3 <= 8000 && x.4.as_deref() == Some("victim"))
        {
            break x.clone();
        }
        assert!(
            Instant::now() < deadline,
            "victim never checkpointed a shard part way: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let it infer past that checkpoint, then kill it without warning.
    std::thread::sleep(Duration::from_millis(150));
    victim.child.kill();
    let rescuer = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "rescuer",
        &c.url(),
        &[],
        &debug,
    );
    let mut watch = nightshift(Path::new(BIN));
    watch.args([
        "watch",
        "kill",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let w = run(watch, Duration::from_secs(300));
    assert!(
        w.status.success(),
        "{}\n{}",
        output_text(&w),
        rescuer.log_text()
    );
    // The shard was leased again after expiry, under a new token, and resumed at its checkpoint.
    let after = shards(&url);
    let again = after.iter().find(|x| x.0 == held.0).unwrap();
    assert!(again.2 > held.2, "shard {} was not re-leased", held.0);
    let resumed_from = rescuer
        .log_text()
        .lines()
        .filter(|l| l.contains("shard leased") && l.contains(&format!("shard={}", held.0)))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("from_row="))
                .map(str::to_string)
        });
    assert!(
        resumed_from.is_some_and(|r| r.parse::<i64>().unwrap() >= held.3),
        "rescuer did not resume shard {} after its checkpoint",
        held.0
    );
    let (by_victim, by_rescuer) = (
        rows_inferred(std::slice::from_ref(&victim.log)),
        rows_inferred(std::slice::from_ref(&rescuer.log)),
    );
    eprintln!("rows inferred: victim {by_victim}, rescuer {by_rescuer}");
    let inferred = by_victim + by_rescuer;
    let recomputed = inferred.saturating_sub(32000);
    eprintln!(
        "worker killed after checkpoint {} of shard {}; rows recomputed: {recomputed} (checkpoint interval {checkpoint}, batch {batch})",
        held.3, held.0
    );
    assert!(
        recomputed <= checkpoint + 3 * batch,
        "recomputed {recomputed} rows"
    );
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 1000, &[]).assert_exact(&[]);
}

#[test]
fn a_coordinator_restart_mid_job_does_not_fail_it() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = f.job(
        "restart",
        &[
            "--rows",
            "24000",
            "--files",
            "2",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "1024"],
        "[batch]\nsize = 500\n[shards]\nrows = 4000\ncheckpoint_rows = 2000\n",
    );
    let mut c = coordinator(&f, &url, "coord", &["--lease-ttl", "10s"]);
    let _w = WorkerProc::start(Path::new(BIN), f.dir.path(), "w1", &c.url(), &[], &[]);
    assert!(submit(&f, &c.url(), &job.spec, &[]).status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !shards(&url).iter().any(|s| s.1 == "done") {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    c.restart(Duration::from_secs(2));
    let mut watch = nightshift(Path::new(BIN));
    watch.args([
        "watch",
        "restart",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let w = run(watch, Duration::from_secs(300));
    assert!(w.status.success(), "{}", output_text(&w));
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 1000, &[]).assert_exact(&[]);
}

#[test]
fn cancel_stops_the_workers_shards() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = f.job(
        "cancel-me",
        &[
            "--rows",
            "40000",
            "--files",
            "1",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "256"],
        "[batch]\nsize = 500\n[shards]\nrows = 10000\ncheckpoint_rows = 1000\n",
    );
    let c = coordinator(&f, &url, "coord", &["--lease-ttl", "3s"]);
    // At 5,000 rows/s at most the job lasts 8 s: the cancel lands while a shard runs.
    let w = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "w1",
        &c.url(),
        &[],
        &[paced(100)],
    );
    assert!(submit(&f, &c.url(), &job.spec, &[]).status.success());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !shards(&url).iter().any(|s| s.1 == "leased" && s.3 > 0) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut cancel = nightshift(Path::new(BIN));
    // The coordinator and token from the environment this time.
    cancel
        .args(["cancel", "cancel-me", "--json"])
        .env("NIGHTSHIFT_COORDINATOR", c.url())
        .env("NIGHTSHIFT_TOKEN", SUBMIT_TOKEN);
    let o = run(cancel, Duration::from_secs(30));
    assert!(o.status.success(), "{}", output_text(&o));
    let view: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
    assert_eq!(view["state"], "cancelled");
    // Within a heartbeat the worker stops the shard; its checkpoints stop moving.
    std::thread::sleep(Duration::from_secs(3));
    let checkpoints = || {
        shards(&url)
            .into_iter()
            .map(|s| (s.0, s.3))
            .collect::<Vec<_>>()
    };
    let frozen = checkpoints();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        frozen,
        checkpoints(),
        "checkpoints still moving after cancel"
    );
    assert!(w.log_text().contains("shard abandoned"), "{}", w.log_text());
    let mut watch = nightshift(Path::new(BIN));
    watch.args([
        "watch",
        "cancel-me",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    assert_eq!(
        run(watch, Duration::from_secs(30)).status.code(),
        Some(1),
        "watch exits non-zero unless the job succeeded"
    );
    assert!(!job.out.join("_SUCCESS").exists());
}

/// `nightshift retry` as a user meets it: refused with the reason while the job runs, then a
/// cancelled job runs again to an exact output.
#[test]
fn a_cancelled_job_is_retried_from_the_cli_and_runs_to_the_end() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = f.job(
        "retry-me",
        &["--rows", "6000", "--files", "2", "--row-group-rows", "1000"],
        &["--hidden", "16"],
        "[shards]\nrows = 2000\n",
    );
    let c = coordinator(&f, &url, "coord", &[]);
    assert!(submit(&f, &c.url(), &job.spec, &[]).status.success());
    let cli = |args: &[&str]| api_cli(&c, args);
    // No worker yet: the job waits as running, which a retry does not apply to.
    let refused = cli(&["retry", "retry-me"]);
    assert!(!refused.status.success(), "{}", output_text(&refused));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("is running: retry does not apply") && why.contains("409"),
        "{why}"
    );
    let unknown = cli(&["retry", "no-such-job"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no-such-job"),
        "{}",
        output_text(&unknown)
    );
    assert!(cli(&["cancel", "retry-me"]).status.success());
    let retried = cli(&["retry", "retry-me", "--json"]);
    assert!(retried.status.success(), "{}", output_text(&retried));
    let view: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&retried.stdout).trim()).unwrap();
    assert_eq!(view["state"], "running", "{view}");
    let _w = WorkerProc::start(Path::new(BIN), f.dir.path(), "w1", &c.url(), &[], &[]);
    let watched = cli(&["watch", "retry-me"]);
    assert!(watched.status.success(), "{}", output_text(&watched));
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
}

/// `nightshift workers` and `nightshift drain` as an operator taking a machine down meets
/// them: the worker is listed with its lease; a drain of an unknown id is refused by name; a
/// drain of the worker (its id holds a space, `/`, `?` and `#`, so it must go escaped) makes
/// it release what it holds and exit 0; another worker then ends the job exactly.
#[test]
fn a_worker_is_listed_and_drained_from_the_cli() {
    let f = Fixture::new();
    let job = f.job(
        "drain-me",
        &[
            "--rows",
            "60000",
            "--files",
            "2",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "4096"],
        "[shards]\nrows = 10000\n",
    );
    let c = coordinator(&f, f.path("coordinator.db").to_str().unwrap(), "coord", &[]);
    let cli = |args: &[&str]| api_cli(&c, args);
    let listed = |id: &str| -> Option<serde_json::Value> {
        let o = cli(&["workers", "--json"]);
        assert!(o.status.success(), "{}", output_text(&o));
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        list["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .cloned()
    };
    let id = "gpu box/1?#a";
    let mut first = WorkerProc::start(Path::new(BIN), f.dir.path(), id, &c.url(), &[], &[]);
    assert!(submit(&f, &c.url(), &job.spec, &[]).status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while listed(id).is_none_or(|w| w["leases"].as_array().unwrap().is_empty()) {
        assert!(Instant::now() < deadline, "{}", first.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = cli(&["workers"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines().any(|l| l.starts_with(id) && l.ends_with('-')),
        "{text}"
    );

    let unknown = cli(&["drain", "nobody"]);
    assert!(!unknown.status.success());
    let why = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        why.contains("no worker `nobody` is known") && why.contains("404"),
        "{why}"
    );
    let drained = cli(&["drain", id]);
    assert!(drained.status.success(), "{}", output_text(&drained));
    let status = first
        .child
        .wait_for(Duration::from_secs(30))
        .expect("the worker exits once told to drain");
    assert!(status.success(), "exit {status}: {}", first.log_text());
    let view = listed(id).expect("the drained worker is still listed");
    assert_eq!(
        (view["draining"].as_bool(), view["drain_told"].as_bool()),
        (Some(true), Some(true)),
        "{view}"
    );
    assert!(view["leases"].as_array().unwrap().is_empty(), "{view}");
    let table = cli(&["workers"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with(id) && l.ends_with("told")),
        "{text}"
    );

    let _second = WorkerProc::start(Path::new(BIN), f.dir.path(), "w2", &c.url(), &[], &[]);
    let watched = cli(&["watch", "drain-me"]);
    assert!(watched.status.success(), "{}", output_text(&watched));
    // Every row once; the model run again on a sample (a 4096-wide MLP over all rows takes the
    // verifier minutes).
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 1000, &[]).assert_exact(&[]);
}

/// A worker the coordinator refuses (a wrong token, a submit token, an id it does not
/// accept) stops at once with the coordinator's reason and a non-zero exit, instead of
/// claiming in vain for ever and looking alive.
#[test]
fn a_worker_the_coordinator_refuses_exits_with_the_reason() {
    let f = Fixture::new();
    let c = coordinator(&f, f.path("coordinator.db").to_str().unwrap(), "coord", &[]);
    let api = format!("{}/v1", c.url());
    for (url, token, id, why) in [
        (c.url(), "not-a-token", "w1", "(401)"),
        (c.url(), SUBMIT_TOKEN, "w1", "(403)"),
        (c.url(), WORKER_TOKEN, "tab\tid", "control character"),
        // A coordinator URL with a path: no such route.
        (api, WORKER_TOKEN, "w1", "(404)"),
    ] {
        let mut cmd = nightshift(Path::new(BIN));
        cmd.args(["worker", "--coordinator", &url, "--token", token])
            .args(["--worker-id", id, "--spot-metadata", "off", "--cache-dir"])
            .arg(f.path("cache"));
        let o = run(cmd, Duration::from_secs(30));
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(
            text.contains("error: the coordinator refuses this worker") && text.contains(why),
            "{why}: {text}"
        );
    }
}

#[test]
fn the_coordinator_takes_its_settings_from_the_environment() {
    let f = Fixture::new();
    let port = nightshift_tests::process::free_port();
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .env("NIGHTSHIFT_DATABASE_URL", f.path("coordinator.db"))
        .env("NIGHTSHIFT_SUBMIT_TOKENS", "first-token,second-token")
        .env("NIGHTSHIFT_WORKER_TOKENS", "worker-token")
        .env("RUST_LOG", "debug");
    let _c = nightshift_tests::process::ChildGuard::spawn_logged(cmd, &f.path("coordinator.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while nightshift_tests::cluster::http_get_status(port, "/readyz") != Some(200) {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(f.path("coordinator.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (token, ok) in [
        ("first-token", true),
        ("second-token", true),
        ("worker-token", false),
        ("nope", false),
    ] {
        let mut jobs = nightshift(Path::new(BIN));
        jobs.args(["jobs", "--json"])
            .env("NIGHTSHIFT_COORDINATOR", format!("http://127.0.0.1:{port}"))
            .env("NIGHTSHIFT_TOKEN", token);
        let o = run(jobs, Duration::from_secs(30));
        assert_eq!(o.status.success(), ok, "{token}: {}", output_text(&o));
    }
    let log = std::fs::read_to_string(f.path("coordinator.log")).unwrap_or_default();
    assert!(
        !log.contains("first-token") && !log.contains("worker-token"),
        "tokens must not be logged:\n{log}"
    );
}

#[test]
fn the_coordinator_refuses_fewer_database_connections_than_its_pools() {
    let f = Fixture::new();
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args(["coordinator", "--db-connections", "2", "--database-url"])
        .arg(f.path("coordinator.db"))
        .args(["--submit-token", "s", "--worker-token", "w"]);
    let o = run(cmd, Duration::from_secs(30));
    let text = output_text(&o);
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(
        text.contains("--db-connections") && text.contains("3.."),
        "{text}"
    );
}
