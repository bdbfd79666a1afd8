//! A fair backlog: a small job submitted behind a large one of equal priority is served at
//! the next lease round, not after the large one. Real processes: a coordinator, two workers.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::{self, CoordinatorProc, SUBMIT_TOKEN, WorkerProc};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{nightshift, output_text, run};

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
const LARGE_ROWS: u64 = 2_000_000;
/// How long the small job may take, from its submission.
const SMALL_LIMIT: Duration = Duration::from_secs(240);

fn status(coordinator: &str, job: &str) -> serde_json::Value {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args([
        "status",
        job,
        "--json",
        "--coordinator",
        coordinator,
        "--token",
        SUBMIT_TOKEN,
    ]);
    let out = run(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn submit(f: &Fixture, coordinator: &str, spec: &Path) {
    let out = cluster::submit(
        Path::new(BIN),
        f.dir.path(),
        coordinator,
        spec,
        &["--token", SUBMIT_TOKEN],
        &[],
    );
    assert!(out.status.success(), "{}", output_text(&out));
}

#[test]
fn a_small_job_behind_a_large_one_finishes_before_the_large_one_is_half_done() {
    let f = Fixture::new();
    // Heavy enough per row that the large job takes a while on one thread per worker: a shard
    // of it takes seconds, so the small job's wait is a lease round, not the test's polling.
    // (At 256 wide a shard took 0.14 s here, and the large job passed half its rows within the
    // 1 to 2 s of CLI calls that see the small one done.)
    let model = f.model("m.onnx", &["--dim", "8", "--hidden", "2048"]);
    let job = |name: &str, rows: u64, row_group: &str| {
        let data = f.data(
            name,
            &[
                "--rows",
                &rows.to_string(),
                "--files",
                "4",
                "--row-group-rows",
                row_group,
                "--dim",
                "8",
            ],
        );
        let toml = spec_toml(
            name,
            &format!("{}/*.parquet", data.display()),
            &model,
            &f.path(&format!("out-{name}")),
            "[batch]\nsize = 2048\n[shards]\nrows = 50000\n",
        );
        f.spec(&format!("{name}.toml"), &toml)
    };
    let large = job("large", LARGE_ROWS, "50000");
    let small = job("small", 10_000, "2500");
    let db = format!("sqlite://{}", f.path("state/nightshift.db").display());
    let allow = f.allow_uri();
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coordinator",
        &db,
        &["--allow-uri", &allow],
        &[],
    );
    let _workers: Vec<WorkerProc> = ["w1", "w2"]
        .iter()
        .map(|id| {
            WorkerProc::start(
                Path::new(BIN),
                f.dir.path(),
                id,
                &c.url(),
                &["--slots", "1", "--threads", "1"],
                &[],
            )
        })
        .collect();
    submit(&f, &c.url(), &large);
    let started = Instant::now();
    // As soon as the workers hold shards of the large job, the small one comes.
    while status(&c.url(), "large")["shards"]["leased"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(
            started.elapsed() < SMALL_LIMIT,
            "the large job never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    submit(&f, &c.url(), &small);
    let submitted = Instant::now();
    let large_done = loop {
        let small_view = status(&c.url(), "small");
        let large_view = status(&c.url(), "large");
        match small_view["state"].as_str() {
            Some("succeeded") => break large_view["rows_done"].as_u64().unwrap_or(0),
            Some("failed" | "cancelled") => panic!("the small job ended badly: {small_view}"),
            _ => {}
        }
        assert!(
            submitted.elapsed() < SMALL_LIMIT,
            "the small job did not finish: {small_view}\nlarge: {large_view}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "fair: the small job finished {:.1} s after submission, the large one at {large_done} of {LARGE_ROWS} rows",
        submitted.elapsed().as_secs_f64()
    );
    assert!(
        large_done < LARGE_ROWS / 2,
        "the large job was {large_done} of {LARGE_ROWS} rows done when the small one finished"
    );
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args([
        "cancel",
        "large",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    assert!(run(cmd, Duration::from_secs(30)).status.success());
}
