//! A hostile worker: the test process, holding a valid worker token (one the coordinator read
//! from a token file), tries every trick of the round-1 security review against a coordinator
//! on PostgreSQL while honest worker processes run a real job. The job's output is exactly the
//! reference, no file from outside the job's `_parts/` reaches it, no lease of another worker
//! can be touched, and one job's bad part fails that job alone.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_proto::wire::{LeaseRef, LeaseSecret, ShardLease};
use nightshift_tests::cluster::{self, CoordinatorProc, SUBMIT_TOKEN, WorkerProc};
use nightshift_tests::fixtures::{Fixture, GeneratedJob, spec_toml};
use nightshift_tests::parts::{part_path, write_part};
use nightshift_tests::postgres::server_with_database;
use nightshift_tests::process::{nightshift, output_text, run};
use nightshift_tests::verify::verify_output;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// The hostile process's token: valid, known to the coordinator only through a token file.
const HOSTILE_TOKEN: &str = "hostile-but-valid-worker-token";
/// A log line the hostile worker tries to forge through a failure message.
const FORGED: &str = "2026-11-28T00:00:00.000000Z ERROR nightshift_coordinator: forged";

struct Hostile {
    http: reqwest::Client,
    base: String,
}

impl Hostile {
    fn new(coordinator: &CoordinatorProc) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: coordinator.url(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(HOSTILE_TOKEN)
            .json(body)
            .send()
            .await
            .expect("coordinator answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn lease(&self, worker: &str, max: u32) -> Vec<ShardLease> {
        let (s, body) = self
            .post(
                "/v1/worker/lease",
                &json!({"worker_id": worker, "max": max}),
            )
            .await;
        assert_eq!(s, 200, "{body}");
        nightshift_tests::parts::with_specs(&self.http, &self.base, HOSTILE_TOKEN, &body).await
    }

    async fn checkpoint(&self, worker: &str, lease: &ShardLease, part: Value) -> (u16, Value) {
        self.post(
            "/v1/worker/checkpoint",
            &json!({"worker_id": worker, "lease": lease.lease_ref(), "part": part}),
        )
        .await
    }

    async fn release(&self, worker: &str, lease: LeaseRef) -> u16 {
        self.post(
            "/v1/worker/release",
            &json!({"worker_id": worker, "lease": lease}),
        )
        .await
        .0
    }
}

/// A valid Parquet file outside the allow-list (a copy of an input file), in a directory that
/// lives as long as the first value.
fn outside_copy(f: &Fixture) -> (tempfile::TempDir, std::path::PathBuf) {
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("elsewhere.parquet");
    let mut inputs: Vec<_> = std::fs::read_dir(f.path("in"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    std::fs::copy(&inputs[0], &outside).unwrap();
    (elsewhere, outside)
}

/// A coordinator that knows the hostile token only from a file.
fn coordinator(f: &Fixture, url: &str) -> CoordinatorProc {
    let tokens = f.path("worker-tokens");
    std::fs::write(&tokens, format!("\n{HOSTILE_TOKEN}\n")).unwrap();
    let allow = f.allow_uri();
    let tokens = tokens.display().to_string();
    let args = ["--allow-uri", &allow, "--worker-token-file", &tokens];
    CoordinatorProc::start(Path::new(BIN), f.dir.path(), "coord", url, &args, &[])
}

/// `submit` with the submit token from a file.
fn submit(f: &Fixture, coordinator: &str, spec: &Path, extra: &[&str]) -> std::process::Output {
    let token_file = f.path("submit-token");
    std::fs::write(&token_file, SUBMIT_TOKEN).unwrap();
    let auth = ["--token-file", token_file.to_str().unwrap_or_default()];
    cluster::submit(
        Path::new(BIN),
        f.dir.path(),
        coordinator,
        spec,
        &auth,
        extra,
    )
}

/// A job's state and error, through `status --json`.
fn status(f: &Fixture, coordinator: &str, job: &str) -> Value {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path()).args([
        "status",
        job,
        "--json",
        "--coordinator",
        coordinator,
        "--token",
        SUBMIT_TOKEN,
    ]);
    let o = run(cmd, Duration::from_secs(30));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("status: {}", output_text(&o)))
}

fn wait_for_end(f: &Fixture, coordinator: &str, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = status(f, coordinator, job);
        if ["succeeded", "failed", "cancelled"].contains(&s["state"].as_str().unwrap_or("")) {
            return s;
        }
        assert!(Instant::now() < deadline, "job {job} did not end: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn victim(f: &Fixture) -> GeneratedJob {
    f.job(
        "victim",
        &["--rows", "8000", "--files", "2", "--row-group-rows", "500"],
        &["--hidden", "16"],
        "[batch]\nsize = 250\n[shards]\nrows = 1000\ncheckpoint_rows = 500\n",
    )
}

/// Every part trick on a lease the hostile worker holds itself: a file from outside the
/// allow-list, `..`, a link planted at the part's key, counts that do not add up, a text file
/// as an error part, NUL bytes. Each is refused with 400 and nothing is recorded.
async fn part_tricks(h: &Hostile, l: &ShardLease, outside: &Path) {
    let real = write_part(l, 0, 100);
    let dir = part_path(l, 0, false).parent().unwrap().to_path_buf();
    let outside_uri = outside.display().to_string();
    let dotdot = format!("{}/../../../in/x.parquet", dir.display());
    let size = std::fs::metadata(outside).unwrap().len();
    let part = |uri: &str, bytes: u64, rows: u64, error_rows: u64, error_uri: Option<&str>| {
        json!({"uri": uri, "row_start": 0, "rows": rows, "bytes": bytes,
               "error_rows": error_rows, "error_uri": error_uri, "error_bytes": bytes})
    };
    std::fs::write(part_path(l, 0, true), b"not parquet, a note").unwrap();
    let text_errors = part_path(l, 0, true).display().to_string();
    let tricks = [
        (
            "outside the allow-list",
            part(&outside_uri, size, 100, 0, None),
        ),
        ("`..` out of _parts", part(&dotdot, size, 100, 0, None)),
        (
            "inflated error rows",
            part(&real.uri, real.bytes, 10, 11, Some(&text_errors)),
        ),
        ("no rows", part(&real.uri, real.bytes, 0, 0, None)),
        (
            "an error part elsewhere",
            part(&real.uri, real.bytes, 10, 1, Some(&outside_uri)),
        ),
        (
            "NUL in the uri",
            part(&format!("{}\u{0}", real.uri), real.bytes, 10, 0, None),
        ),
    ];
    for (what, body) in tricks {
        let (s, answer) = h.checkpoint("evil", l, body).await;
        assert_eq!(s, 400, "{what}: {answer}");
    }
    std::fs::remove_file(part_path(l, 0, false)).unwrap();
    std::os::unix::fs::symlink(outside, part_path(l, 0, false)).unwrap();
    let (s, answer) = h
        .checkpoint("evil", l, part(&real.uri, size, 100, 0, None))
        .await;
    assert_eq!(s, 400, "a link at the part's key: {answer}");
    std::fs::remove_file(part_path(l, 0, false)).unwrap();
}

/// Leases of other workers: with the right token but a guessed secret, or the right secret
/// but another worker id, nothing touches them.
async fn lease_tricks(h: &Hostile) {
    let theirs = h.lease("bystander", 1).await.remove(0);
    let mut guessed = theirs.lease_ref();
    guessed.secret = LeaseSecret::from_u128(rand::random());
    for (worker, lease) in [("evil", guessed), ("evil", theirs.lease_ref())] {
        let fail =
            json!({"worker_id": worker, "lease": lease, "class": "permanent", "message": "x"});
        let (s, body) = h.post("/v1/worker/fail", &fail).await;
        assert_eq!(
            (s, body["code"].as_str()),
            (409, Some("lease_lost")),
            "{body}"
        );
        assert_eq!(h.release(worker, lease).await, 409);
        let beat = json!({"worker_id": worker, "leases": [lease]});
        let (_, body) = h.post("/v1/worker/heartbeat", &beat).await;
        assert_eq!(body["leases"][0]["state"], "lost", "{body}");
    }
    assert_eq!(h.release("bystander", theirs.lease_ref()).await, 200);
}

/// Lease calls with a NUL byte, mixed with good ones: each bad one gets 400 naming the field,
/// every good one its answer (they are coalesced into shared statements on PostgreSQL).
async fn nul_flood(h: &Hostile) {
    let calls = (0..200).map(|i| async move {
        let worker = if i % 2 == 0 {
            format!("probe-{i}")
        } else {
            format!("probe\u{0}{i}")
        };
        let (s, body) = h
            .post("/v1/worker/lease", &json!({"worker_id": worker, "max": 1}))
            .await;
        (i % 2 == 0, s, body)
    });
    for (good, s, body) in futures::future::join_all(calls).await {
        if good {
            assert_eq!(s, 200, "{body}");
        } else {
            assert_eq!(s, 400, "{body}");
            assert!(
                body["message"].as_str().unwrap_or("").contains("worker_id"),
                "{body}"
            );
        }
    }
}

#[test]
fn a_hostile_worker_cannot_publish_foreign_files_or_touch_other_leases() {
    let f = Fixture::new();
    let (rt, _pg, url) = server_with_database();
    let job = victim(&f);
    let (_elsewhere, outside) = outside_copy(&f);
    let coord = coordinator(&f, &url);
    let h = Hostile::new(&coord);
    rt.block_on(nul_flood(&h));
    let o = submit(
        &f,
        &coord.url(),
        &job.spec,
        &["--idempotency-key", "victim-1"],
    );
    assert!(o.status.success(), "{}", output_text(&o));
    rt.block_on(async {
        let mine = h.lease("evil", 2).await;
        part_tricks(&h, &mine[0], &outside).await;
        // A failure message that tries to forge a log line: accepted as text, logged escaped.
        let fail = json!({"worker_id": "evil", "lease": mine[1].lease_ref(), "class": "retryable",
                          "message": format!("oops\n{FORGED}")});
        assert_eq!(h.post("/v1/worker/fail", &fail).await.0, 200);
        assert_eq!(h.release("evil", mine[0].lease_ref()).await, 200);
        lease_tricks(&h).await;
    });
    let workers: Vec<WorkerProc> = ["w1", "w2"]
        .iter()
        .map(|id| WorkerProc::start(Path::new(BIN), f.dir.path(), id, &coord.url(), &[], &[]))
        .collect();
    // While they work, guessed leases (every shard, small tokens, random secrets) fail nothing.
    rt.block_on(async {
        for round in 0..3 {
            for shard in 1..=20i64 {
                for token in 1..=3i64 {
                    let lease = LeaseRef {
                        shard_id: shard,
                        token,
                        secret: LeaseSecret::from_u128(rand::random()),
                    };
                    let body = json!({"worker_id": format!("w{}", 1 + round % 2), "lease": lease,
                                      "class": "permanent", "message": "guessed"});
                    let (s, answer) = h.post("/v1/worker/fail", &body).await;
                    assert_eq!(s, 409, "a guessed lease was accepted: {answer}");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let end = wait_for_end(&f, &coord.url(), "victim");
    assert_eq!(
        end["state"],
        "succeeded",
        "{end}\n{}",
        workers.iter().map(|w| w.log_text()).collect::<String>()
    );
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(job.out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["error_files"],
        json!([]),
        "a note became an error file: {manifest}"
    );
    let log = std::fs::read_to_string(&coord.log).unwrap();
    assert!(log.contains("forged"), "the failure was logged");
    assert!(
        !log.lines().any(|l| l.starts_with(FORGED)),
        "a worker forged a log line:\n{log}"
    );
}

/// The hostile worker leases every one of `n` shards of the job `victim`, checkpoints a
/// stand-in part of the right size at the right key for each, calls `after` on the lease, and
/// completes it.
async fn commit_every_shard(h: &Hostile, n: u32, after: impl Fn(&ShardLease)) {
    let leases = h.lease("evil", n).await;
    assert_eq!(leases.len(), n as usize);
    for l in &leases {
        assert_eq!(l.spec.name, "victim");
        let part = write_part(l, 0, l.plan.rows);
        let (s, body) = h
            .checkpoint("evil", l, serde_json::to_value(&part).unwrap())
            .await;
        assert_eq!(s, 200, "{body}");
        after(l);
        let done = json!({"worker_id": "evil", "lease": l.lease_ref()});
        assert_eq!(h.post("/v1/worker/complete", &done).await.0, 200);
    }
}

#[test]
fn a_link_planted_after_a_checkpoint_is_never_merged() {
    let f = Fixture::new();
    let (rt, _pg, url) = server_with_database();
    let a = victim(&f);
    let (_elsewhere, outside) = outside_copy(&f);
    let coord = coordinator(&f, &url);
    let h = Hostile::new(&coord);
    assert!(submit(&f, &coord.url(), &a.spec, &[]).status.success());
    // Each part, once accepted, is swapped for a link to a valid Parquet file from elsewhere.
    rt.block_on(commit_every_shard(&h, 8, |l| {
        let path = part_path(l, 0, false);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();
    }));
    let _w = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "honest",
        &coord.url(),
        &[],
        &[],
    );
    let end = wait_for_end(&f, &coord.url(), "victim");
    assert_eq!(end["state"], "failed", "{end}");
    let error = end["error"].as_str().unwrap_or_default();
    assert!(error.contains("not a plain file"), "{end}");
    assert!(!a.out.join("_manifest.json").exists());
}

#[test]
fn a_part_that_cannot_be_read_fails_its_own_job_and_no_other() {
    let f = Fixture::new();
    let (rt, _pg, url) = server_with_database();
    let a = victim(&f);
    let b_spec = f.spec(
        "b.toml",
        &spec_toml(
            "bystander",
            &a.input,
            &a.model,
            &f.path("out-b"),
            "[shards]\nrows = 4000\n",
        ),
    );
    let coord = coordinator(&f, &url);
    let h = Hostile::new(&coord);
    assert!(submit(&f, &coord.url(), &a.spec, &[]).status.success());
    assert!(submit(&f, &coord.url(), &b_spec, &[]).status.success());
    // The hostile worker takes every shard of the first job and commits garbage of the right
    // size at the right keys.
    rt.block_on(commit_every_shard(&h, 8, |_| {}));
    // An honest worker takes the merge work over the garbage, and the other job.
    let _w = WorkerProc::start(
        Path::new(BIN),
        f.dir.path(),
        "honest",
        &coord.url(),
        &[],
        &[],
    );
    let a_end = wait_for_end(&f, &coord.url(), "victim");
    assert_eq!(a_end["state"], "failed", "{a_end}");
    let error = a_end["error"].as_str().unwrap_or_default();
    // The merge cannot read the garbage: it fails for good, naming the part.
    assert!(
        error.contains("_parts/") && error.contains("corrupt Parquet data"),
        "{a_end}"
    );
    assert!(!a.out.join("_SUCCESS").exists());
    // The next job is committed all the same.
    let b_end = wait_for_end(&f, &coord.url(), "bystander");
    assert_eq!(b_end["state"], "succeeded", "{b_end}");
    verify_output(
        f.path("out-b").to_str().unwrap(),
        &a.input,
        &a.model,
        0,
        &[],
    )
    .assert_exact(&[]);
}
