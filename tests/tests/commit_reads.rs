//! The commit reads no row data and copies none: on the local S3 server, a coordinator that
//! reaches the store only through a recording proxy runs and commits a job whose workers made
//! its output files in place; every byte it fetched from the job's data objects (checking
//! checkpoints and committing) is counted, and it is footers only, and it wrote none of them.
//! The workers reach the store directly, so the proxy sees the coordinator alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nightshift_coordinator::AllowList;
use nightshift_metastore::Metastore;
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_storage::Stores;
use nightshift_tests::api_server::start_with;
use nightshift_tests::fault_proxy::{FaultPlan, FaultProxy};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::python::ort_library;
use nightshift_tests::s3::{S3Server, env_for, settings};
use nightshift_tests::verify::verify_output_with;
use nightshift_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// The most a footer read may fetch from one part (the reader's tail prefetch and more).
const FOOTER_READ_MAX: u64 = 256 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn the_commit_fetches_footers_and_no_row_data() {
    let f = Fixture::new();
    let s3 = S3Server::start().await.expect("moto");
    s3.create_bucket("lake").await.unwrap();
    // ~0.3 KB of output per row (the features pass through): parts of ~1 MB, files of ~2 MB.
    let data = f.data(
        "in",
        &[
            "--rows",
            "24000",
            "--files",
            "2",
            "--row-group-rows",
            "2000",
            "--dim",
            "64",
        ],
    );
    let model = f.model("m.onnx", &["--hidden", "16", "--dim", "64"]);
    s3.upload_dir(&data, "s3://lake/in/").await.unwrap();
    s3.put("s3://lake/m.onnx", std::fs::read(&model).unwrap())
        .await
        .unwrap();
    let out = "s3://lake/out/reads";
    let toml = spec_toml(
        "reads",
        "s3://lake/in/*.parquet",
        Path::new("s3://lake/m.onnx"),
        Path::new(&format!("{out}/")),
        "[shards]\nrows = 4000\ncheckpoint_rows = 4000\n",
    )
    .replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\", \"features\"]\ntarget_file_mb = 2",
    );
    let proxy = FaultProxy::start(s3.addr(), FaultPlan::none()).unwrap();
    let sqlite = SqliteStore::open(&f.path("state/db.sqlite")).await.unwrap();
    sqlite.migrate().await.unwrap();
    let coordinator_stores = Arc::new(Stores::new(settings(&proxy.endpoint())));
    let api = start_with(
        Arc::new(sqlite),
        AllowList::everything(),
        30_000,
        coordinator_stores,
    )
    .await;
    let (s, body) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    let mut config = WorkerConfig::new(&api.url, "W");
    config.ort_lib = Some(ort_library());
    config.cache_dir = f.path("models");
    let worker =
        Worker::build(config, Arc::new(Stores::new(settings(&s3.endpoint())))).expect("worker");
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    api.wait_succeeded("reads", Duration::from_secs(180)).await;
    stop.cancel();
    running.await.expect("worker task").expect("worker");

    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.get(&format!("{out}/_manifest.json")).await.unwrap()).unwrap();
    let files = manifest["files"].as_array().expect("files in the manifest");
    let output_bytes: u64 = files.iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
    assert!(files.len() >= 2, "{manifest}");
    // The job's data files: its parts, and the output files its merge work wrote in place.
    let out_path = format!("{}/", out.trim_start_matches("s3:/"));
    let is_data = |target: &str| target.starts_with(&out_path) && target.contains(".parquet");
    let exchanges = proxy.exchanges();
    let part_reads: Vec<_> = exchanges
        .iter()
        .filter(|e| e.method == "GET" && is_data(&e.target))
        .collect();
    let writes: Vec<_> = exchanges
        .iter()
        .filter(|e| matches!(e.method.as_str(), "PUT" | "POST") && is_data(&e.target))
        .collect();
    assert!(
        writes.is_empty(),
        "the commit wrote or copied data: {writes:?}"
    );
    let fetched: u64 = part_reads.iter().map(|e| e.response_body_bytes).sum();
    eprintln!(
        "commit fetched {fetched} bytes in {} reads of parts for {output_bytes} bytes of output in {} files",
        part_reads.len(),
        files.len()
    );
    assert!(
        !part_reads.is_empty(),
        "the coordinator checks the footers of the files merge work wrote in place"
    );
    for e in &part_reads {
        assert!(
            e.response_body_bytes <= FOOTER_READ_MAX,
            "a read of {} bytes is more than a footer: {e:?}",
            e.response_body_bytes
        );
    }
    assert!(
        fetched * 20 < output_bytes,
        "{fetched} bytes fetched for {output_bytes} bytes of output"
    );
    let envs = env_for(&s3.endpoint());
    let input = format!("{}/*.parquet", data.display());
    verify_output_with(&envs, out, &input, &model, 0, &[]).assert_exact(&[]);
}
