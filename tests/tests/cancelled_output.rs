//! Merge work writes output files in place, so a job cancelled mid-run leaves files at output
//! names. Another job may then take the output (a cancelled job holds none); it must not be
//! blocked by those files, and must not adopt them: at its submission the cancelled job's files
//! go, and the new job's output is its own and exact.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_coordinator::AllowList;
use nightshift_proto::layout::JOB_UID_KEY;
use nightshift_tests::api_server::start;
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::python::ort_library;
use nightshift_tests::verify::verify_output;
use nightshift_worker::{Worker, WorkerConfig};
use parquet::file::reader::{FileReader, SerializedFileReader};
use tokio_util::sync::CancellationToken;

/// The job a data file's footer names.
fn owner(path: &Path) -> Option<String> {
    let reader = SerializedFileReader::new(std::fs::File::open(path).ok()?).ok()?;
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()?
        .clone();
    kv.into_iter()
        .find(|kv| kv.key == JOB_UID_KEY)
        .and_then(|kv| kv.value)
}

fn data_files(out: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(out)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_taking_a_cancelled_jobs_output_is_not_blocked_by_its_files() {
    let f = Fixture::new();
    // ~1 MB of parts per shard (the features pass through), one file per shard or so.
    let data = f.data(
        "in",
        &[
            "--rows",
            "96000",
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
    let toml = |name: &str| {
        spec_toml(
            name,
            &input,
            &model,
            &out,
            "[shards]\nrows = 4000\ncheckpoint_rows = 4000\n",
        )
        .replace(
            "passthrough = [\"id\"]",
            "passthrough = [\"id\", \"features\"]\ntarget_file_mb = 1",
        )
    };
    let api = start(&f, AllowList::everything(), 30_000).await;
    let worker = || {
        let mut config = WorkerConfig::new(&api.url, "W");
        config.ort_lib = Some(ort_library());
        config.cache_dir = f.path("models");
        Worker::build(config, Default::default()).expect("worker")
    };
    let (s, body) = api.submit(Some("S"), None, &toml("first")).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker().run(stop.clone()));
    // Cancel the first job as soon as its merge work has written a file in place.
    let deadline = Instant::now() + Duration::from_secs(120);
    while data_files(&out).is_empty() {
        if Instant::now() > deadline {
            let (_, view) = api.get(Some("S"), "/v1/jobs/first").await;
            panic!("no merged file appeared: {view}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, body) = api.post("S", "/v1/jobs/first/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    stop.cancel();
    running.await.expect("worker");
    let left: Vec<_> = data_files(&out).iter().filter_map(|p| owner(p)).collect();
    assert!(
        !left.is_empty(),
        "the cancelled job left files at output names"
    );

    let (s, body) = api.submit(Some("S"), None, &toml("second")).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker().run(stop.clone()));
    api.wait_succeeded("second", Duration::from_secs(180)).await;
    stop.cancel();
    running.await.expect("worker");
    verify_output(out.to_str().unwrap(), &input, &model, 0, &[]).assert_exact(&[]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    let second_uid = manifest["job_uid"].as_str().expect("job_uid").to_string();
    assert!(!left.contains(&second_uid), "{left:?}");
    for file in data_files(&out) {
        assert_eq!(
            owner(&file).as_deref(),
            Some(second_uid.as_str()),
            "{} is not the second job's",
            file.display()
        );
    }
}

/// A cancelled job whose files went when a later job took its output cannot be retried, even
/// once that job is cancelled too and the output is free again: its checkpoints name parts
/// that no longer exist. The refusal says so (409) and the job stays cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_whose_files_were_removed_is_not_retried() {
    let f = Fixture::new();
    let data = f.data("in", &["--rows", "2000", "--files", "1"]);
    let model = f.model("m.onnx", &[]);
    let input = format!("{}/*.parquet", data.display());
    let out = f.path("out");
    let api = start(&f, AllowList::everything(), 30_000).await;
    for name in ["first", "second"] {
        let (s, body) = api
            .submit(Some("S"), None, &spec_toml(name, &input, &model, &out, ""))
            .await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
        let (s, body) = api.post("S", &format!("/v1/jobs/{name}/cancel")).await;
        assert!(s.is_success(), "{s}: {body}");
    }
    let (s, body) = api.post("S", "/v1/jobs/first/retry").await;
    assert_eq!(s, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(body.contains("files were removed"), "{body}");
    let (_, view) = api.get(Some("S"), "/v1/jobs/first").await;
    assert!(view.contains("\"state\":\"cancelled\""), "{view}");
    // The later job's own files are still there to retry from.
    let (s, body) = api.post("S", "/v1/jobs/second/retry").await;
    assert!(s.is_success(), "{s}: {body}");
}
