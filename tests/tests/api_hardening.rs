//! What the API refuses, as an attacker with a token would try it (security review of round
//! 1): outputs owned by one job, parts and counts from workers checked, leases bound to their
//! holder, text with control characters refused at the door, error bodies always
//! `{code, message}` and short, symlinks resolved before the allow-list, `/readyz` quick when
//! the database hangs. A real coordinator over HTTP on 127.0.0.1 with a real store.

use std::time::{Duration, Instant};

use nightshift_coordinator::AllowList;
use nightshift_metastore::Metastore;
use nightshift_metastore::postgres::PgStore;
use nightshift_proto::wire::{LeaseSecret, ShardLease};
use nightshift_tests::PgServer;
use nightshift_tests::api_server::{Api, job, start, start_on};
use nightshift_tests::fixtures::Fixture;
use nightshift_tests::parts::{part_path, write_part};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `post` on the API with the worker token, answering the status and the JSON body.
async fn post(api: &Api, path: &str, body: &Value) -> (StatusCode, Value) {
    let resp = api
        .http
        .post(format!("{}{path}", api.url))
        .bearer_auth("W")
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends a submission whose headers announce `length` bytes of body and no byte of it, and
/// reads the answer: the coordinator must refuse on the announced length alone. (Streaming
/// the body with a client races the early answer: the server closes while the client still
/// writes, and the client sees a broken pipe instead of the 413.)
async fn announce_oversized_body(url: &str, length: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer S\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || complete_response(&answer) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the coordinator answers before the body arrives");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// Whether `raw` holds a whole HTTP/1.1 response with a `content-length` body.
fn complete_response(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// Submits the fixture's job and leases `n` of its shards as `worker`.
async fn leased(api: &Api, f: &Fixture, worker: &str, n: u32) -> Vec<ShardLease> {
    let (s, body) = api.submit(Some("S"), None, &job(f)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    lease(api, worker, n).await
}

async fn lease(api: &Api, worker: &str, n: u32) -> Vec<ShardLease> {
    let (s, body) = post(
        api,
        "/v1/worker/lease",
        &json!({"worker_id": worker, "max": n}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    nightshift_tests::parts::with_specs(&api.http, &api.url, "W", &body).await
}

/// A file of the fixture's generated input.
fn first_input(f: &Fixture) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(f.path("in"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.remove(0)
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_belongs_to_one_job_and_never_to_its_own_input() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let toml = job(&f);
    let (s, first) = api.submit(Some("S"), None, &toml).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    // Another job into the same output, or one inside it: refused, naming the owner.
    let out = f.path("out").display().to_string();
    for (name, output) in [("second", out.clone()), ("nested", format!("{out}/day=1"))] {
        let spec = toml
            .replace("api-job", name)
            .replace(&format!("uri = \"{out}\""), &format!("uri = \"{output}\""));
        let (s, body) = api.submit(Some("S"), None, &spec).await;
        assert_eq!(s, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["code"], "conflict");
        assert!(message(&body).contains("`api-job`"), "{body}");
    }
    // An output that is the input's directory, or inside it: refused before anything is queued.
    let input_dir = f.path("in").display().to_string();
    for output in [input_dir.clone(), format!("{input_dir}/scores")] {
        let spec = toml
            .replace("api-job", "self-eating")
            .replace(&format!("uri = \"{out}\""), &format!("uri = \"{output}\""));
        let (s, body) = api.submit(Some("S"), None, &spec).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(message(&body).contains("overlaps the input"), "{body}");
    }
    let (_, list) = api.get(Some("S"), "/v1/jobs").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn parts_must_be_the_leases_own_and_counts_must_add_up() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let l = leased(&api, &f, "w1", 1).await.remove(0);
    let good = write_part(&l, 0, 100);
    let checkpoint = |part: Value| json!({"worker_id": "w1", "lease": l.lease_ref(), "part": part});
    let part_json = |uri: &str, rows: u64, error_rows: u64, error_uri: Option<&str>| {
        json!({"uri": uri, "row_start": 0, "rows": rows, "bytes": good.bytes,
               "error_rows": error_rows, "error_uri": error_uri})
    };
    let input = first_input(&f).display().to_string();
    let parts_dir = part_path(&l, 0, false).parent().unwrap().to_path_buf();
    let dotdot = format!("{}/../../in/part-00000.parquet", parts_dir.display());
    let cases = [
        (
            "a file outside the output",
            part_json(&input, 100, 0, None),
            "is not `",
        ),
        (
            "`..` out of _parts",
            part_json(&dotdot, 100, 0, None),
            "is not `",
        ),
        (
            "no rows",
            part_json(&good.uri, 0, 0, None),
            "at least one row",
        ),
        (
            "more errors than rows",
            part_json(&good.uri, 10, 11, Some(&good.uri)),
            "exceed",
        ),
        (
            "past the shard",
            part_json(&good.uri, 1_000_000, 0, None),
            "does not fit",
        ),
        (
            "an error part elsewhere",
            part_json(&good.uri, 10, 1, Some(&input)),
            "error_uri",
        ),
    ];
    for (what, part, says) in cases {
        let (s, body) = post(&api, "/v1/worker/checkpoint", &checkpoint(part)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["code"], "invalid_part", "{what}: {body}");
        assert!(message(&body).contains(says), "{what}: {body}");
    }
    // The right key, but the size is not what is there; then a link planted at the key.
    let mut wrong_size = part_json(&good.uri, 100, 0, None);
    wrong_size["bytes"] = json!(good.bytes + 1);
    let (s, body) = post(&api, "/v1/worker/checkpoint", &checkpoint(wrong_size)).await;
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_part"))
    );
    std::fs::remove_file(part_path(&l, 0, false)).unwrap();
    std::os::unix::fs::symlink(&input, part_path(&l, 0, false)).unwrap();
    let mut linked = part_json(&good.uri, 100, 0, None);
    linked["bytes"] = json!(std::fs::metadata(&input).unwrap().len());
    let (s, body) = post(&api, "/v1/worker/checkpoint", &checkpoint(linked)).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a link at the part's key: {body}"
    );
    assert!(message(&body).contains("not a plain file"), "{body}");
    // The real thing goes through, and the checkpoint moved.
    std::fs::remove_file(part_path(&l, 0, false)).unwrap();
    let good = write_part(&l, 0, 100);
    let (s, body) = post(
        &api,
        "/v1/worker/checkpoint",
        &checkpoint(serde_json::to_value(&good).unwrap()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_is_usable_only_by_its_holder_with_its_secret() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let l = leased(&api, &f, "holder", 1).await.remove(0);
    let mine = l.lease_ref();
    let mut guessed = mine;
    guessed.secret = LeaseSecret::from_u128(mine.secret.as_u128() ^ 1);
    let fail = |worker: &str, lease| json!({"worker_id": worker, "lease": lease, "class": "permanent", "message": "sabotage"});
    for (what, path, body) in [
        (
            "another worker fails it",
            "/v1/worker/fail",
            fail("thief", mine),
        ),
        (
            "a guessed secret fails it",
            "/v1/worker/fail",
            fail("holder", guessed),
        ),
        (
            "another worker releases it",
            "/v1/worker/release",
            json!({"worker_id": "thief", "lease": mine}),
        ),
        (
            "another worker completes it",
            "/v1/worker/complete",
            json!({"worker_id": "thief", "lease": mine}),
        ),
    ] {
        let (s, body) = post(&api, path, &body).await;
        assert_eq!(s, StatusCode::CONFLICT, "{what}: {body}");
        assert_eq!(body["code"], "lease_lost", "{what}: {body}");
    }
    let beat = |worker: &str, lease| json!({"worker_id": worker, "leases": [lease]});
    let (_, body) = post(&api, "/v1/worker/heartbeat", &beat("thief", mine)).await;
    assert_eq!(body["leases"][0]["state"], "lost", "{body}");
    let (_, body) = post(&api, "/v1/worker/heartbeat", &beat("holder", guessed)).await;
    assert_eq!(body["leases"][0]["state"], "lost", "{body}");
    // Through all of it the holder kept its lease.
    let (_, body) = post(&api, "/v1/worker/heartbeat", &beat("holder", mine)).await;
    assert_eq!(body["leases"][0]["state"], "held", "{body}");
    let missing =
        json!({"worker_id": "holder", "lease": {"shard_id": mine.shard_id, "token": mine.token}});
    let (s, body) = post(&api, "/v1/worker/release", &missing).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "a lease without its secret: {body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn control_characters_are_refused_at_the_door_naming_the_field() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let l = leased(&api, &f, "w1", 1).await.remove(0);
    let cases = [
        (
            "/v1/worker/lease",
            json!({"worker_id": "w\u{0}1", "max": 1}),
            "worker_id",
        ),
        (
            "/v1/worker/heartbeat",
            json!({"worker_id": "w\u{0}1", "leases": []}),
            "worker_id",
        ),
        (
            "/v1/worker/fail",
            json!({"worker_id": "w1", "lease": l.lease_ref(), "class": "retryable", "message": "x\u{0}"}),
            "message",
        ),
        (
            "/v1/worker/checkpoint",
            json!({"worker_id": "w1", "lease": l.lease_ref(), "part": {"uri": "/a\u{0}b", "row_start": 0, "rows": 1, "bytes": 1}}),
            "part.uri",
        ),
    ];
    for (path, body, field) in cases {
        let (s, answer) = post(&api, path, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {answer}");
        assert!(message(&answer).contains(field), "{path}: {answer}");
    }
    let spec = job(&f)
        .replace("api-job", "other")
        .replace("/out\"", "/o\\u0000ut\"");
    let (s, body) = api.submit(Some("S"), None, &spec).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(message(&body).contains("output.uri"), "{body}");
    let (s, body) = api.get(Some("S"), "/v1/jobs/a%00b").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    // So are schedule names (PostgreSQL refuses a NUL byte: it answered 503).
    let (s, body) = api.get(Some("S"), "/v1/schedules/a%00b").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("schedule"), "{body}");
    for action in ["pause", "resume"] {
        let (s, body) = api
            .post("S", &format!("/v1/schedules/a%00b/{action}"))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{action}: {body}");
    }
    let deleted = api
        .http
        .delete(format!("{}/v1/schedules/a%00b", api.url))
        .bearer_auth("S")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::BAD_REQUEST);
    // The lease is untouched and its holder goes on.
    let (_, body) = post(
        &api,
        "/v1/worker/heartbeat",
        &json!({"worker_id": "w1", "leases": [l.lease_ref()]}),
    )
    .await;
    assert_eq!(body["leases"][0]["state"], "held", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_is_json_short_and_the_scheme_is_case_insensitive() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let (status, body) = announce_oversized_body(&api.url, 50 << 20).await;
    assert_eq!(status, 413, "{body}");
    let body: Value = serde_json::from_str(&body).expect("413 has a JSON body");
    assert_eq!(body["code"], "too_large", "{body}");
    let (s, text) = api.get(Some("S"), "/v1/nowhere").await;
    let body: Value = serde_json::from_str(&text).expect("404 has a JSON body");
    assert_eq!(
        (s, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, text) = api.get(Some("W"), "/v1/worker/lease").await;
    let body: Value = serde_json::from_str(&text).expect("405 has a JSON body");
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    // A 10,000-character name is not echoed back whole.
    let long = job(&f).replace("api-job", &"n".repeat(10_000));
    let (s, body) = api.submit(Some("S"), None, &long).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        message(&body).len() < 400,
        "{} characters",
        message(&body).len()
    );
    // `bearer`, `BEARER`: the scheme's case does not matter.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = api
            .http
            .get(format!("{}/v1/jobs", api.url))
            .header("authorization", format!("{scheme} S"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn links_are_followed_before_the_allow_list_judges() {
    let f = Fixture::new();
    let toml = job(&f);
    let allowed = f.path("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    // A link inside the allowed directory to the fixture's directory, which is not allowed.
    std::os::unix::fs::symlink(f.dir.path(), allowed.join("escape")).unwrap();
    let api = start(
        &f,
        AllowList::new(vec![allowed.display().to_string()]),
        30_000,
    )
    .await;
    let root = f.dir.path().display().to_string();
    let via_link = toml.replace(&root, &format!("{}/escape", allowed.display()));
    let (s, body) = api.submit(Some("S"), None, &via_link).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "uri_not_allowed");
    // Real files in the allowed directory, but the glob matches a link leading out.
    let inside = allowed.join("in");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::copy(f.path("m.onnx"), allowed.join("m.onnx")).unwrap();
    std::os::unix::fs::symlink(first_input(&f), inside.join("a.parquet")).unwrap();
    let spec = toml
        .replace(&format!("{root}/in/"), &format!("{}/", inside.display()))
        .replace(
            &format!("{root}/m.onnx"),
            &allowed.join("m.onnx").display().to_string(),
        )
        .replace(
            &format!("{root}/out"),
            &allowed.join("out").display().to_string(),
        );
    let (s, body) = api.submit(Some("S"), None, &spec).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("input.uri"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_answers_within_a_second_when_the_database_hangs() {
    let pg = PgServer::start().await.unwrap();
    let store = PgStore::connect(&pg.fresh_database().await.unwrap())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let f = Fixture::new();
    let api = start_on(std::sync::Arc::new(store), AllowList::everything(), 30_000).await;
    assert_eq!(api.get(None, "/readyz").await.0, StatusCode::OK);
    // The server and its backends stop answering, but their connections stay open: a hang,
    // not a refusal.
    let pid = pg.pid().to_string();
    let signal = |sig: &str| {
        let children = std::process::Command::new("pkill")
            .args([sig, "-P", &pid])
            .status()
            .unwrap();
        let server = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        children.success() && server.success()
    };
    assert!(signal("-STOP"));
    let began = Instant::now();
    let (s, text) = api.get(None, "/readyz").await;
    let took = began.elapsed();
    assert!(signal("-CONT"));
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(took < Duration::from_millis(1900), "readyz took {took:?}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "unavailable");
    drop(f);
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_samples_reach_metrics_and_nonsense_is_refused() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let l = leased(&api, &f, "gpu-box", 1).await.remove(0);
    let sample = |index: u32, busy: u32, used: u64| {
        json!({"index": index, "utilization_percent": busy,
               "memory_used_bytes": used, "memory_total_bytes": 1000})
    };
    let beat =
        |gpus: Value| json!({"worker_id": "gpu-box", "leases": [l.lease_ref()], "gpus": gpus});
    for (what, gpus) in [
        ("over 100% busy", json!([sample(0, 101, 1)])),
        (
            "more memory used than there is",
            json!([sample(0, 50, 1001)]),
        ),
        (
            "a device twice",
            json!([sample(0, 50, 1), sample(0, 60, 1)]),
        ),
    ] {
        let (s, body) = post(&api, "/v1/worker/heartbeat", &beat(gpus)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert!(message(&body).starts_with("gpus:"), "{what}: {body}");
    }
    let (s, body) = post(
        &api,
        "/v1/worker/heartbeat",
        &beat(json!([sample(0, 93, 400), sample(1, 5, 10)])),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, text) = api.get(Some("S"), "/metrics").await;
    assert!(
        text.contains("nightshift_worker_gpu_busy_ratio{worker=\"gpu-box\",gpu=\"0\"} 0.93"),
        "{text}"
    );
    assert!(
        text.contains("nightshift_worker_gpu_memory_used_bytes{worker=\"gpu-box\",gpu=\"1\"} 10")
    );
    assert!(
        text.contains("nightshift_pending_rows"),
        "beside the queue depth"
    );
}
