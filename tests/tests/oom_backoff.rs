//! Out of device memory: a model call the device cannot hold is halved, and later calls stay
//! at the size that fit, until the job is done with the exact output. The error is injected
//! (the `model-run-oom` failpoint fails every call above N rows), since CI has no GPU to fill;
//! the coordinator, worker, ONNX Runtime and files are real.

use std::sync::Arc;
use std::time::Duration;

use nightshift_coordinator::AllowList;
use nightshift_storage::Stores;
use nightshift_tests::api_server::{Api, job, start};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::python::ort_library;
use nightshift_tests::verify::verify_output;
use nightshift_worker::context::WorkerReport;
use nightshift_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Rows of the fixture's job, and its batch size (the spec's default).
const ROWS: u64 = 2000;
const BATCH: u64 = 1024;

/// Runs the fixture's job to the end with one in-process worker; answers its report.
async fn run_job(f: &Fixture, api: &Api) -> WorkerReport {
    run_spec(f, api, &job(f), "api-job").await
}

/// Runs the job of `spec`, named `name`, to the end with one in-process worker.
async fn run_spec(f: &Fixture, api: &Api, spec: &str, name: &str) -> WorkerReport {
    let (s, body) = api.submit(Some("S"), None, spec).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    let mut config = WorkerConfig::new(&api.url, "W");
    config.ort_lib = Some(ort_library());
    config.cache_dir = f.path("models");
    let worker = Worker::build(config, Arc::new(Stores::default())).expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    api.wait_succeeded(name, Duration::from_secs(120)).await;
    stop.cancel();
    running.await.expect("worker task").expect("worker")
}

fn verify(f: &Fixture) {
    let input = format!("{}/*.parquet", f.path("in").display());
    let out = f.path("out");
    verify_output(out.to_str().unwrap(), &input, &f.path("m.onnx"), 0, &[]).assert_exact(&[]);
}

// One test: the failpoint is global to the process, so the run without it must not overlap
// the run with it.
#[tokio::test(flavor = "multi_thread")]
async fn calls_the_device_cannot_hold_are_halved_until_they_fit() {
    const LIMIT: u64 = 300;
    // Without the fault, each call is a whole batch (here a shard of 500 rows).
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let report = run_job(&f, &api).await;
    assert_eq!(report.largest_model_call, 500, "{report:?}");
    assert!(report.largest_model_call <= BATCH);
    let (_, text) = api.get(Some("S"), "/v1/jobs/api-job").await;
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["batch_rows"], BATCH, "the spec's size: {view}");
    verify(&f);
    // With it, calls above LIMIT rows fail for lack of memory: they are halved and stay small.
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    fail::cfg("model-run-oom", &format!("return({LIMIT})")).unwrap();
    let report = run_job(&f, &api).await;
    fail::remove("model-run-oom");
    assert!(
        report.largest_model_call <= LIMIT && report.largest_model_call >= LIMIT / 2,
        "{report:?}"
    );
    assert!(report.model_calls >= ROWS.div_ceil(LIMIT), "{report:?}");
    assert_eq!(report.rows, ROWS, "{report:?}");
    assert_eq!(report.error_rows, 0, "no row is poison for lack of memory");
    // The job's status shows the size that fit.
    let (_, text) = api.get(Some("S"), "/v1/jobs/api-job").await;
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shown = view["batch_rows"]
        .as_u64()
        .expect("batch_rows in the status");
    assert!((LIMIT / 2..=LIMIT).contains(&shown), "{view}");
    verify(&f);

    // A large batch the device holds one row of at a time: its calls are many, each of one
    // row, and none of them deepens the inference thread's stack.
    const WIDE: u64 = 20_000;
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let rows = WIDE.to_string();
    let data = f.data(
        "in",
        &["--rows", &rows, "--files", "1", "--row-group-rows", &rows],
    );
    let spec = spec_toml(
        "one-row-calls",
        &format!("{}/*.parquet", data.display()),
        &f.model("m.onnx", &["--hidden", "16"]),
        &f.path("out"),
        &format!("[shards]\nrows = {WIDE}\n\n[batch]\nsize = {WIDE}\n"),
    );
    fail::cfg("model-run-oom", "return(1)").unwrap();
    let report = run_spec(&f, &api, &spec, "one-row-calls").await;
    fail::remove("model-run-oom");
    assert_eq!(
        (report.rows, report.largest_model_call),
        (WIDE, 1),
        "{report:?}"
    );
    assert_eq!(report.error_rows, 0, "{report:?}");
    verify(&f);
}
