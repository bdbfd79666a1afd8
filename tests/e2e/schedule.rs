//! Schedules on a real cluster: two coordinator processes on one PostgreSQL, a schedule firing
//! every few seconds, one coordinator killed and restarted while it runs. Every fire time
//! yields exactly one job, whichever replica handled it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::postgres::server_with_database;
use nightshift_tests::process::{nightshift, output_text, run};
use nightshift_tests::python::run_script;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// How far apart fire times are.
const EVERY_S: i64 = 3;
/// How long the schedule runs.
const RUN_FOR: Duration = Duration::from_secs(60);

fn cli(args: &[&str], coordinator: &str) -> String {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args(args)
        .args(["--coordinator", coordinator, "--token", SUBMIT_TOKEN]);
    let out = run(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(idempotency key, jobs with it)` of every job.
fn jobs_by_key(url: &str) -> BTreeMap<String, i64> {
    let out = run_script(
        "query_postgres.py",
        &[
            url,
            "SELECT idempotency_key, COUNT(*) FROM jobs GROUP BY idempotency_key",
        ],
    );
    let rows: Vec<(Option<String>, i64)> = serde_json::from_str(out.trim()).unwrap();
    rows.into_iter()
        .map(|(key, n)| (key.unwrap_or_default(), n))
        .collect()
}

#[test]
fn two_coordinators_make_one_job_per_fire_time_while_one_is_killed() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let data = f.data("in", &["--rows", "200", "--files", "1"]);
    let model = f.model("m.onnx", &["--hidden", "8"]);
    let template = spec_toml(
        "nightly",
        &format!("{}/*.parquet", data.display()),
        &model,
        &f.path("out/{{ datetime }}"),
        "",
    );
    let spec = f.spec("nightly.toml", &template);
    let allow = f.allow_uri();
    let start = |name: &str| {
        CoordinatorProc::start(
            Path::new(BIN),
            f.dir.path(),
            name,
            &url,
            &["--allow-uri", &allow],
            &[],
        )
    };
    let mut a = start("coord-a");
    let b = start("coord-b");
    let cron = format!("*/{EVERY_S} * * * * *");
    let created = cli(
        &[
            "schedule",
            "create",
            "nightly",
            "--cron",
            &cron,
            "--json",
            spec.to_str().unwrap(),
        ],
        &a.url(),
    );
    let view: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(view["catch_up"], "latest", "{view}");
    let began = Instant::now();
    let mut kills = 0;
    while began.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_secs(7));
        a.restart(Duration::from_millis(1500));
        kills += 1;
    }
    cli(&["schedule", "pause", "nightly"], &b.url());
    let shown = cli(&["schedule", "show", "nightly", "--json"], &b.url());
    let view: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(view["paused"], true, "{view}");

    let jobs = jobs_by_key(&url);
    let mut fires: Vec<i64> = jobs
        .keys()
        .map(|k| {
            k.strip_prefix("schedule:nightly:")
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(|| panic!("a job not made by the schedule: {k:?}"))
        })
        .collect();
    fires.sort_unstable();
    assert!(
        jobs.values().all(|&n| n == 1),
        "a fire time made two jobs: {jobs:?}"
    );
    let expected = RUN_FOR.as_secs() as i64 / EVERY_S;
    assert!(
        fires.len() as i64 >= expected - 2,
        "{} fire times in {RUN_FOR:?}, expected about {expected}: {fires:?}",
        fires.len()
    );
    for pair in fires.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            EVERY_S * 1000,
            "a fire time was skipped or doubled: {fires:?}"
        );
    }
    // What each fire time made is recorded once, and names its job.
    let recorded = run_script(
        "query_postgres.py",
        &[
            &url,
            "SELECT COUNT(*) AS n, COUNT(DISTINCT fire_at_ms) AS fires, COUNT(job_id) AS jobs \
             FROM schedule_fires",
        ],
    );
    let counts: Vec<(i64, i64, i64)> = serde_json::from_str(recorded.trim()).unwrap();
    let n = fires.len() as i64;
    assert_eq!(counts, [(n, n, n)], "fire records vs {n} jobs");
    eprintln!(
        "schedule: {n} fire times, {n} jobs, {kills} coordinator kills in {:.0} s",
        began.elapsed().as_secs_f64()
    );
}
