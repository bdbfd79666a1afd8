//! Planning in the background (issue 15, item 1): a job over more input files than `submit`
//! plans before it answers is accepted as `planning`, its first shards are leased while the
//! rest is planned, a coordinator killed mid-plan plans on where it stopped, the plan is exact,
//! and a bad file found late fails the job naming it. The coordinator reads its footers slowly
//! (the `plan-piece-delay` failpoint) so the planning phase can be watched.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_proto::JobState;
use nightshift_proto::wire::{JobView, Manifest};
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc};
use nightshift_tests::fixtures::{Fixture, GeneratedJob};
use nightshift_tests::postgres::server_with_database;
use nightshift_tests::process::{nightshift, output_text, run};
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// More than `submit` plans inline, and more than two of the planner's pieces.
const FILES: usize = 600;
const ROWS_PER_FILE: usize = 10;
/// Each piece of the plan waits this long before its footers are read.
const PIECE_DELAY: &str = "plan-piece-delay=return(1500)";
const DEADLINE: Duration = Duration::from_secs(180);

fn many_files(f: &Fixture) -> GeneratedJob {
    let rows = (FILES * ROWS_PER_FILE).to_string();
    let files = FILES.to_string();
    f.job(
        "planned",
        &[
            "--rows",
            &rows,
            "--files",
            &files,
            "--row-group-rows",
            "10",
            "--dim",
            "8",
        ],
        &["--dim", "8", "--hidden", "8"],
        "[shards]\nrows = 100\n",
    )
}

fn coordinator(f: &Fixture, db: &str) -> CoordinatorProc {
    replica(f, db, "coord")
}

fn replica(f: &Fixture, db: &str, name: &str) -> CoordinatorProc {
    let envs = [
        ("FAILPOINTS".to_string(), PIECE_DELAY.to_string()),
        // How each replica's planning of a job ended.
        (
            "RUST_LOG".to_string(),
            "warn,nightshift_coordinator::planning=info".to_string(),
        ),
    ];
    CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        name,
        db,
        &["--allow-uri", &f.allow_uri()],
        &envs,
    )
}

fn submit(f: &Fixture, c: &CoordinatorProc, spec: &Path) -> JobView {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path()).args([
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
        "--json",
    ]);
    let out = run(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", output_text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(answer["job"].clone()).unwrap()
}

fn status(c: &CoordinatorProc, job: i64) -> Option<JobView> {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args([
        "status",
        &job.to_string(),
        "--json",
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
    ]);
    let out = run(cmd, Duration::from_secs(30));
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls the job until `done` holds of it; panics with the coordinator's log past the deadline.
fn wait_for(c: &CoordinatorProc, job: i64, what: &str, done: impl Fn(&JobView) -> bool) -> JobView {
    let start = Instant::now();
    loop {
        if let Some(view) = status(c, job)
            && done(&view)
        {
            return view;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "job {job} never {what}: {:?}\n{}",
            status(c, job),
            std::fs::read_to_string(&c.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn many_files_are_planned_in_the_background_and_planning_survives_a_kill() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = many_files(&f);
    let mut c = coordinator(&f, &url);
    let workers: Vec<WorkerProc> = ["w1", "w2"]
        .iter()
        .map(|id| WorkerProc::start(Path::new(BIN), f.dir.path(), id, &c.url(), &[], &[]))
        .collect();

    let submitted = submit(&f, &c, &job.spec);
    assert_eq!(submitted.state, JobState::Planning, "{submitted:?}");
    let progress = submitted.planning.as_ref().expect("planning progress");
    assert!(progress.files_planned < FILES as u64, "{progress:?}");

    // The first shards run while the rest is planned.
    let leased = wait_for(&c, submitted.id, "leased a shard while planning", |v| {
        v.state == JobState::Planning && v.shards.leased + v.shards.done > 0
    });
    let planned = leased.planning.expect("planning progress").files_planned;
    assert!(planned > 0 && planned < FILES as u64, "{planned}");

    // Killed mid-plan, the coordinator plans on from the files recorded.
    c.restart(Duration::from_millis(200));
    let done = wait_for(&c, submitted.id, "ended", |v| v.state.is_terminal());
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "{done:?}\n{}",
        workers
            .iter()
            .map(|w| w.log_text())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(done.rows_total, (FILES * ROWS_PER_FILE) as u64);
    assert!(done.planning.is_none());
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(job.out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.input_rows, (FILES * ROWS_PER_FILE) as u64);
    assert_eq!(manifest.input_snapshot.len(), FILES);
    let mut uris: Vec<&str> = manifest
        .input_snapshot
        .iter()
        .map(|i| i.uri.as_str())
        .collect();
    uris.dedup();
    assert_eq!(uris.len(), FILES, "an input file was planned twice");
}

#[test]
fn a_bad_file_found_while_planning_fails_the_job_naming_it() {
    let f = Fixture::new();
    let job = many_files(&f);
    let bad = Path::new(&job.input)
        .parent()
        .unwrap()
        .join(format!("part-{:03}.parquet", FILES - 10));
    std::fs::write(&bad, b"not parquet at all").unwrap();
    let db = format!("sqlite://{}", f.path("state/nightshift.db").display());
    let c = coordinator(&f, &db);

    let submitted = submit(&f, &c, &job.spec);
    assert_eq!(submitted.state, JobState::Planning, "{submitted:?}");
    let failed = wait_for(&c, submitted.id, "ended", |v| v.state.is_terminal());
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains("is not a Parquet file") && error.contains(bad.to_str().unwrap()),
        "{error}"
    );
}

/// Two replicas on one database: one plans the job (it holds the claim), the other neither
/// lists its input nor has a piece refused and starts over.
#[test]
fn of_two_replicas_one_plans_a_job() {
    let f = Fixture::new();
    let (_rt, _pg, url) = server_with_database();
    let job = many_files(&f);
    let a = replica(&f, &url, "coord-a");
    let b = replica(&f, &url, "coord-b");
    let submitted = submit(&f, &a, &job.spec);
    assert_eq!(submitted.state, JobState::Planning, "{submitted:?}");
    let planned = wait_for(&a, submitted.id, "planned", |v| v.planning.is_none());
    assert_eq!(planned.rows_total, (FILES * ROWS_PER_FILE) as u64);
    let logs = [&a, &b].map(|c| std::fs::read_to_string(&c.log).unwrap_or_default());
    let count = |what: &str| logs.iter().map(|l| l.matches(what).count()).sum::<usize>();
    assert_eq!(count("planning done"), 1, "{logs:#?}");
    assert_eq!(
        count("planning stopped"),
        0,
        "a replica planned in vain: {logs:#?}"
    );
}
