//! A worker's slots across shards and jobs: model sessions stay loaded between jobs (bounded
//! by the slot's cache, least recently used dropped first), and a slot starts its next shard
//! while the last batches of the current one finish. The coordinator, worker, ONNX Runtime and
//! files are real; every output is checked by the independent verifier.

use std::sync::Arc;
use std::time::Duration;

use nightshift_coordinator::AllowList;
use nightshift_storage::Stores;
use nightshift_tests::api_server::start;
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::python::ort_library;
use nightshift_tests::verify::verify_output;
use nightshift_worker::context::WorkerReport;
use nightshift_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Jobs in submission order, as (name, model file, priority): two models, the first one back
/// last. Priorities fall in that order, so the slot runs the jobs one after another (among
/// equal priorities, claims would interleave them).
const JOBS: [(&str, &str, i32); 3] = [
    ("a", "m1.onnx", 3),
    ("b", "m2.onnx", 2),
    ("c", "m1.onnx", 1),
];

/// Submits the three jobs over the same input, runs them to the end with one in-process
/// worker of one slot keeping `model_cache` sessions, and checks every output.
async fn run_jobs(model_cache: usize) -> WorkerReport {
    let f = Fixture::new();
    let data = f.data(
        "in",
        &["--rows", "4000", "--files", "2", "--row-group-rows", "500"],
    );
    f.model("m1.onnx", &["--hidden", "16"]);
    f.model("m2.onnx", &["--hidden", "8"]);
    let input = format!("{}/*.parquet", data.display());
    let api = start(&f, AllowList::everything(), 1_500).await;
    for (name, model, priority) in JOBS {
        let toml = spec_toml(
            name,
            &input,
            &f.path(model),
            &f.path(&format!("out-{name}")),
            "[shards]\nrows = 500\n[batch]\nsize = 100\n",
        )
        .replacen('\n', &format!("\npriority = {priority}\n"), 1);
        let (s, body) = api.submit(Some("S"), None, &toml).await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    }
    let mut config = WorkerConfig::new(&api.url, "W");
    config.ort_lib = Some(ort_library());
    config.cache_dir = f.path("models");
    config.model_cache = model_cache;
    config.idle_poll = Duration::from_millis(100);
    let worker = Worker::build(config, Arc::new(Stores::default())).expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    for (name, _, _) in JOBS {
        api.wait_succeeded(name, Duration::from_secs(120)).await;
    }
    stop.cancel();
    let report = running.await.expect("worker task").expect("worker");
    for (name, model, _) in JOBS {
        let out = f.path(&format!("out-{name}"));
        verify_output(out.to_str().unwrap(), &input, &f.path(model), 0, &[]).assert_exact(&[]);
    }
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_stay_loaded_across_jobs_within_the_cache_bound() {
    // A cache of 4: the first model is still loaded when the third job comes back to it.
    let report = run_jobs(4).await;
    assert_eq!(report.model_loads, 2, "{report:?}");
    assert_eq!(report.rows, 3 * 4000, "{report:?}");
    // Eight shards per job on one slot: the next shard was leased and read while the
    // current one finished.
    assert!(report.shards_read_ahead > 0, "{report:?}");
    // A cache of 1: the second model evicts the first, which is loaded again.
    let report = run_jobs(1).await;
    assert_eq!(report.model_loads, 3, "{report:?}");
}
