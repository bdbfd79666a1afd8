//! `/v1/openapi.json` against the coordinator that serves it: every documented operation is
//! routed, and real answers of the main routes (jobs, leases, the dashboard's reads, schedules,
//! errors) match the schemas the document gives them.

use nightshift_coordinator::AllowList;
use nightshift_proto::wire::CheckpointRequest;
use nightshift_tests::api_server::{Api, job, start};
use nightshift_tests::fixtures::Fixture;
use nightshift_tests::parts::{with_specs, write_part};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The document, and a check of a body against the schema it gives one answer.
struct Doc(Value);

impl Doc {
    async fn fetch(api: &Api) -> Self {
        let (status, text) = api.get(None, "/v1/openapi.json").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        Self(serde_json::from_str(&text).unwrap())
    }

    /// The errors of `body` against the schema of `method path` answering `status`.
    fn errors(&self, method: &str, path: &str, status: u16, body: &Value) -> Vec<String> {
        let answer = &self.0["paths"][path][method]["responses"][status.to_string()];
        let schema = &answer["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status}: no JSON schema in {answer}"
        );
        // The schema's references point into the document's components.
        let mut root = schema.clone();
        root["components"] = self.0["components"].clone();
        let validator = jsonschema::validator_for(&root).unwrap();
        validator.iter_errors(body).map(|e| e.to_string()).collect()
    }

    fn check(&self, method: &str, path: &str, status: u16, body: &Value) {
        let errors = self.errors(method, path, status, body);
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {errors:?} in {body}"
        );
    }
}

async fn call(
    api: &Api,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = api
        .http
        .request(method, format!("{}{path}", api.url))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_routed() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let doc = Doc::fetch(&api).await;
    let paths = doc.0["paths"].as_object().unwrap();
    assert!(paths.len() >= 20, "{paths:?}");
    for (path, item) in paths {
        let concrete = path
            .replace("{job}", "1")
            .replace("{name}", "nightly")
            .replace("{hash}", &"0".repeat(64))
            .replace("{file}", "app.js");
        for method in item.as_object().unwrap().keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = api
                .http
                .request(m, format!("{}{concrete}", api.url))
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {text}"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND && text.contains("no such route")),
                "{method} {path} is documented but not routed"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_answers_match_their_schemas() {
    let f = Fixture::new();
    let api = start(&f, AllowList::everything(), 30_000).await;
    let doc = Doc::fetch(&api).await;

    let (status, submitted) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(status, StatusCode::CREATED);
    doc.check("post", "/v1/jobs", 201, &submitted);
    let id = submitted["job"]["id"].as_i64().unwrap();

    // A worker takes a shard, reports its slots and commits a part.
    let (status, leased) = call(
        &api,
        Method::POST,
        "/v1/worker/lease",
        "W",
        Some(json!({"worker_id": "w1", "max": 1})),
    )
    .await;
    assert_eq!(status, 200, "{leased}");
    doc.check("post", "/v1/worker/lease", 200, &leased);
    // Leases name their job's spec by hash; a worker fetches it once.
    assert!(leased["leases"][0].get("spec").is_none(), "{leased}");
    let lease = with_specs(&api.http, &api.url, "W", &leased)
        .await
        .remove(0);
    let (status, spec) = call(
        &api,
        Method::GET,
        &format!("/v1/worker/specs/{}", lease.spec_hash),
        "W",
        None,
    )
    .await;
    assert_eq!(status, 200, "{spec}");
    doc.check("get", "/v1/worker/specs/{hash}", 200, &spec);
    let beat = json!({"worker_id": "w1", "leases": [lease.lease_ref()], "slots": 2});
    let (status, answer) = call(&api, Method::POST, "/v1/worker/heartbeat", "W", Some(beat)).await;
    assert_eq!(status, 200, "{answer}");
    doc.check("post", "/v1/worker/heartbeat", 200, &answer);
    let part = write_part(&lease, 0, 100);
    let checkpoint = CheckpointRequest {
        worker_id: "w1".into(),
        lease: lease.lease_ref(),
        part,
        batch_rows: None,
    };
    let body = serde_json::to_value(&checkpoint).unwrap();
    let (status, ack) = call(&api, Method::POST, "/v1/worker/checkpoint", "W", Some(body)).await;
    assert_eq!(status, 200, "{ack}");
    doc.check("post", "/v1/worker/checkpoint", 200, &ack);

    let (_, list) = call(&api, Method::GET, "/v1/jobs?limit=5", "S", None).await;
    doc.check("get", "/v1/jobs", 200, &list);
    let (_, view) = call(&api, Method::GET, &format!("/v1/jobs/{id}"), "S", None).await;
    doc.check("get", "/v1/jobs/{job}", 200, &view);
    assert_eq!(view["rows_done"], 100, "{view}");

    let (_, shards) = call(
        &api,
        Method::GET,
        &format!("/v1/jobs/{id}/shards"),
        "S",
        None,
    )
    .await;
    doc.check("get", "/v1/jobs/{job}/shards", 200, &shards);
    let rows: Vec<(i64, i64)> = shards["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["row_start"].as_i64().unwrap(),
                s["rows"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [(0, 500), (500, 500), (1000, 500), (1500, 500)],
        "{shards}"
    );
    let (_, throughput) = call(
        &api,
        Method::GET,
        &format!("/v1/jobs/{id}/throughput"),
        "S",
        None,
    )
    .await;
    doc.check("get", "/v1/jobs/{job}/throughput", 200, &throughput);
    let committed: i64 = throughput["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rows"].as_i64().unwrap())
        .sum();
    assert_eq!(committed, 100, "{throughput}");
    let (_, workers) = call(&api, Method::GET, "/v1/workers", "S", None).await;
    doc.check("get", "/v1/workers", 200, &workers);
    assert_eq!(workers["workers"][0]["id"], "w1", "{workers}");
    assert_eq!(workers["workers"][0]["slots"], 2, "{workers}");
    assert_eq!(
        workers["workers"][0]["leases"][0]["rows_done"], 100,
        "{workers}"
    );

    let spec = job(&f).replace("/out\"", "/out/{{ date }}/\"");
    let schedule = json!({"name": "nightly", "cron": "0 2 * * *", "spec": spec});
    let (status, created) = call(&api, Method::POST, "/v1/schedules", "S", Some(schedule)).await;
    assert_eq!(status, 201, "{created}");
    doc.check("post", "/v1/schedules", 201, &created);
    let (_, schedules) = call(&api, Method::GET, "/v1/schedules", "S", None).await;
    doc.check("get", "/v1/schedules", 200, &schedules);

    let (status, missing) = call(&api, Method::GET, "/v1/jobs/no-such-job", "S", None).await;
    assert_eq!(status, 404);
    doc.check("get", "/v1/jobs/{job}", 404, &missing);
    let (status, refused) = call(
        &api,
        Method::POST,
        "/v1/worker/lease",
        "S",
        Some(json!({"worker_id": "w1", "max": 1})),
    )
    .await;
    assert_eq!(status, 403);
    doc.check("post", "/v1/worker/lease", 403, &refused);

    // The schemas are strict enough to catch a wrong answer.
    let mut wrong = view.clone();
    wrong["rows_done"] = json!("many");
    assert!(!doc.errors("get", "/v1/jobs/{job}", 200, &wrong).is_empty());
    let mut wrong = view.clone();
    wrong.as_object_mut().unwrap().remove("state");
    assert!(!doc.errors("get", "/v1/jobs/{job}", 200, &wrong).is_empty());
    wrong = view;
    wrong["state"] = json!("sleeping");
    assert!(!doc.errors("get", "/v1/jobs/{job}", 200, &wrong).is_empty());
}
