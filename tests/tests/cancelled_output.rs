//! Merge work writes output files in place, so a job cancelled mid-run leaves files at output
//! names. Another job may then take the output (a cancelled job holds none); it must not be
//! blocked by those files, and must not adopt them: at its submission the cancelled job's files
//! go, and the new job's output is its own and exact.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nightshift_coordinator::AllowList;
use nightshift_proto::FailureClass;
use nightshift_proto::layout::{JOB_UID_KEY, MANIFEST, SUCCESS, parts_dir};
use nightshift_proto::wire::ShardLease;
use nightshift_tests::api_server::{Api, job, start};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::parts::write_part;
use nightshift_tests::python::ort_library;
use nightshift_tests::verify::verify_output;
use nightshift_worker::client::CoordinatorClient;
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

/// Jobs over the same inputs and output, whose merge work writes ~1 MB files in place.
struct Case {
    api: Api,
    input: String,
    model: PathBuf,
    out: PathBuf,
    models: PathBuf,
}

impl Case {
    async fn new(f: &Fixture) -> Self {
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
        Self {
            api: start(f, AllowList::everything(), 30_000).await,
            input: format!("{}/*.parquet", data.display()),
            model: f.model("m.onnx", &["--hidden", "16", "--dim", "64"]),
            out: f.path("out"),
            models: f.path("models"),
        }
    }

    async fn submit(&self, name: &str) {
        let toml = spec_toml(
            name,
            &self.input,
            &self.model,
            &self.out,
            "[shards]\nrows = 4000\ncheckpoint_rows = 4000\n",
        )
        .replace(
            "passthrough = [\"id\"]",
            "passthrough = [\"id\", \"features\"]\ntarget_file_mb = 1",
        );
        let (s, body) = self.api.submit(Some("S"), None, &toml).await;
        assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
    }

    /// A worker running until `stop`.
    fn worker(
        &self,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<
        Result<nightshift_worker::WorkerReport, nightshift_worker::WorkerError>,
    > {
        let mut config = WorkerConfig::new(&self.api.url, "W");
        config.ort_lib = Some(ort_library());
        config.cache_dir = self.models.clone();
        let worker = Worker::build(config, Default::default()).expect("worker");
        tokio::spawn(worker.run(stop.clone()))
    }

    /// Runs job `name` until its merge work has written a file in place, then cancels it and
    /// stops the worker: the job leaves files at output names.
    async fn cancelled_midway(&self, name: &str) -> Vec<String> {
        self.submit(name).await;
        let stop = CancellationToken::new();
        let running = self.worker(&stop);
        let deadline = Instant::now() + Duration::from_secs(120);
        while data_files(&self.out).is_empty() {
            if Instant::now() > deadline {
                let (_, view) = self.api.get(Some("S"), &format!("/v1/jobs/{name}")).await;
                panic!("no merged file appeared: {view}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (s, body) = self.api.post("S", &format!("/v1/jobs/{name}/cancel")).await;
        assert!(s.is_success(), "{s}: {body}");
        stop.cancel();
        running.await.expect("worker task").expect("worker");
        let left: Vec<_> = data_files(&self.out)
            .iter()
            .filter_map(|p| owner(p))
            .collect();
        assert!(
            !left.is_empty(),
            "the cancelled job left files at output names"
        );
        left
    }

    /// The parts directory of the cancelled job that owns the files `left`.
    fn parts_of(&self, left: &[String]) -> PathBuf {
        self.out.join(parts_dir(&left[0]))
    }

    /// Runs job `name`, submitted already, to success; checks that its output is exact and
    /// that every file at an output name is its own, none of `others`'.
    async fn succeeds_alone(&self, name: &str, others: &[String]) {
        let stop = CancellationToken::new();
        let running = self.worker(&stop);
        self.api
            .wait_succeeded(name, Duration::from_secs(180))
            .await;
        stop.cancel();
        running.await.expect("worker task").expect("worker");
        let out = self.out.to_str().unwrap();
        verify_output(out, &self.input, &self.model, 0, &[]).assert_exact(&[]);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.out.join("_manifest.json")).unwrap())
                .unwrap();
        let uid = manifest["job_uid"].as_str().expect("job_uid").to_string();
        assert!(!others.contains(&uid), "{others:?}");
        for file in data_files(&self.out) {
            assert_eq!(
                owner(&file).as_deref(),
                Some(uid.as_str()),
                "{} is not the job's own",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_taking_a_cancelled_jobs_output_is_not_blocked_by_its_files() {
    let f = Fixture::new();
    let case = Case::new(&f).await;
    let left = case.cancelled_midway("first").await;
    let parts = case.parts_of(&left);
    assert!(parts.is_dir(), "the cancelled job's parts are there");
    case.submit("second").await;
    // Nothing can resume from them: they go with its files.
    assert!(!parts.exists(), "{} is left", parts.display());
    // A part its worker writes late (it learns of the cancel at its next call) goes with the
    // next job's commit.
    std::fs::create_dir_all(&parts).unwrap();
    std::fs::write(parts.join("late.parquet"), b"late").unwrap();
    case.succeeds_alone("second", &left).await;
    assert!(!parts.exists(), "{} is left", parts.display());
}

/// The cancelled job's worker may finish a merged file after the next job's submission
/// cleared the output (it learns of the cancel at its next call). The next job's merge work
/// then meets that file at its own output name: the file goes and the merge is tried again,
/// so the job still succeeds with an output of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_a_cancelled_jobs_worker_finishes_late_does_not_fail_the_next_job() {
    let f = Fixture::new();
    let case = Case::new(&f).await;
    let left = case.cancelled_midway("first").await;
    let aside = f.path("aside");
    std::fs::create_dir_all(&aside).unwrap();
    let late: Vec<PathBuf> = data_files(&case.out);
    for file in &late {
        std::fs::rename(file, aside.join(file.file_name().unwrap())).unwrap();
    }
    case.submit("second").await;
    // The late writes land after the submission's clean-up.
    for file in &late {
        std::fs::rename(aside.join(file.file_name().unwrap()), file).unwrap();
    }
    case.succeeds_alone("second", &left).await;
}

/// Submits the fixture's job under the name `name`.
async fn submit_as(api: &Api, f: &Fixture, name: &str) {
    let spec = job(f).replace("api-job", name);
    let (s, body) = api.submit(Some("S"), None, &spec).await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{body}");
}

/// Leases every row shard `w` is granted, checkpoints each whole and completes them; answers
/// how many there were.
async fn run_row_shards(w: &CoordinatorClient) -> usize {
    let leases = w.lease("hand", 10).await.unwrap().leases;
    for l in &leases {
        w.checkpoint(l.lease_ref(), write_part(l, 0, l.plan.rows), None)
            .await
            .unwrap();
    }
    let refs = leases.iter().map(|l| l.lease_ref()).collect();
    assert!(
        w.complete_many(refs)
            .await
            .unwrap()
            .iter()
            .all(Result::is_ok)
    );
    leases.len()
}

/// The next lease of `w` for merge work, waiting for the coordinator to plan it.
async fn merge_lease(w: &CoordinatorClient) -> ShardLease {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leases = w.lease("hand", 10).await.expect("lease").leases;
        if let Some(l) = leases.into_iter().find(|l| l.merge_files.is_some()) {
            return l;
        }
        assert!(Instant::now() < deadline, "no merge work was granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Merge work that met a cancelled job's file at its output name says whose it was
/// (`taken_by`), and is tried again even when that file is gone by the time its report
/// arrives: when two merges meet two such files at once, the first report's clean-up removes
/// both, and the second must not die for finding nothing left to remove. A file of any other
/// job is never a reason to try again.
#[tokio::test(flavor = "multi_thread")]
async fn merge_work_that_met_a_cancelled_jobs_file_is_retried_though_the_file_went_first() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let w = CoordinatorClient::new(&api.url, "W").for_worker("hand");
    submit_as(&api, &f, "first").await;
    let cancelled_uid = w.lease("hand", 1).await.unwrap().leases[0].job_uid.clone();
    let (s, body) = api.post("S", "/v1/jobs/first/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    submit_as(&api, &f, "second").await;
    assert_eq!(run_row_shards(&w).await, 4, "the second job's row shards");
    // No file of the cancelled job is left at the output: the report names it all the same.
    let merge = merge_lease(&w).await;
    let met = |by: &str| Some(by.to_string());
    w.fail_taken(
        merge.lease_ref(),
        FailureClass::Permanent,
        "taken".into(),
        met(&cancelled_uid),
    )
    .await
    .unwrap();
    // Tried again (else no merge is granted again); a file of a job that was never cancelled
    // here is the end of it.
    let again = merge_lease(&w).await;
    assert_eq!(again.shard_id, merge.shard_id);
    w.fail_taken(
        again.lease_ref(),
        FailureClass::Permanent,
        "taken".into(),
        met("0123456789abcdef"),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, view) = api.get(Some("S"), "/v1/jobs/second").await;
        let view: serde_json::Value = serde_json::from_str(&view).unwrap();
        if view["state"] == "failed" {
            assert!(view["error"].as_str().unwrap().contains("taken"), "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "the job did not fail: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Merge work of a cancelled job is no longer its output's: its report of a file met
/// (`taken_by`) clears nothing. Before, a cancelled job's merge lease, still held until it
/// expired, could report such a file after a later job took the output and was cancelled in
/// turn, and that later job's files went with it: it could no longer be retried.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_jobs_merge_work_clears_no_later_jobs_files() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let w = CoordinatorClient::new(&api.url, "W").for_worker("hand");
    submit_as(&api, &f, "first").await;
    assert_eq!(run_row_shards(&w).await, 4, "the job's row shards");
    let stale = merge_lease(&w).await;
    let (s, body) = api.post("S", "/v1/jobs/first/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    // A later job takes the output, writes a part, and is cancelled: it can be retried.
    submit_as(&api, &f, "second").await;
    let l = w.lease("hand", 1).await.unwrap().leases.remove(0);
    assert_ne!(l.job_uid, stale.job_uid);
    let part = write_part(&l, 0, l.plan.rows);
    w.checkpoint(l.lease_ref(), part.clone(), None)
        .await
        .unwrap();
    let (s, body) = api.post("S", "/v1/jobs/second/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    // The first job's merge lease has not expired; its report of a file met is refused or
    // taken, but clears nothing of the second job's.
    let _ = w
        .fail_taken(
            stale.lease_ref(),
            FailureClass::Permanent,
            "taken".into(),
            Some(l.job_uid.clone()),
        )
        .await;
    assert!(Path::new(&part.uri).exists(), "the second job's part went");
    let (s, body) = api.post("S", "/v1/jobs/second/retry").await;
    assert!(s.is_success(), "{s}: {body}");
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

/// Writes a manifest of job `uid` and a `_SUCCESS` at `out`, as a commit publishes them.
fn publish(out: &Path, uid: &str) {
    let manifest = serde_json::json!({
        "job": "api-job", "job_uid": uid, "spec_hash": "", "total_rows": 0, "input_rows": 0,
        "error_rows": 0, "files": [], "schema": [], "input_snapshot": []
    });
    std::fs::write(out.join(MANIFEST), manifest.to_string()).unwrap();
    std::fs::write(out.join(SUCCESS), b"").unwrap();
}

/// A job cancelled after its commit published (the cancel landed between the commit's last
/// steps, or a coordinator died between writing `_SUCCESS` and recording the end) takes its
/// `_SUCCESS` and manifest back: no reader trusts the output, and the output's next job is not
/// refused as if it were committed. Another job's manifest is never taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_cancelled_after_publishing_takes_its_success_and_manifest_back() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let w = CoordinatorClient::new(&api.url, "W").for_worker("hand");
    submit_as(&api, &f, "first").await;
    let uid = w
        .lease("hand", 1)
        .await
        .unwrap()
        .leases
        .remove(0)
        .job_uid
        .clone();
    let out = f.path("out");
    publish(&out, &uid);
    let (s, body) = api.post("S", "/v1/jobs/first/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    assert!(
        !out.join(SUCCESS).exists(),
        "the cancelled job's _SUCCESS went"
    );
    assert!(
        !out.join(MANIFEST).exists(),
        "the cancelled job's manifest went"
    );
    submit_as(&api, &f, "second").await;
    publish(&out, "another-job");
    let (s, body) = api.post("S", "/v1/jobs/second/cancel").await;
    assert!(s.is_success(), "{s}: {body}");
    assert!(out.join(SUCCESS).exists() && out.join(MANIFEST).exists());
}
