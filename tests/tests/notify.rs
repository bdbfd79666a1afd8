//! Completion callbacks against a receiver in this process (real HTTP on 127.0.0.1): the POST
//! carries the job's final status, signed with HMAC-SHA256 over the body; a 500 is tried again
//! with backoff until acknowledged, each try recorded; a job still running gets none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use nightshift_coordinator::{AllowList, CallbackConfig};
use nightshift_metastore::Metastore;
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_storage::Stores;
use nightshift_tests::api_server::{self, Api, job};
use nightshift_tests::fixtures::Fixture;
use nightshift_worker::client::CoordinatorClient;
use sha2::Sha256;

const SECRET: &[u8] = b"callback secret";
/// How long a callback may take to arrive, retries included.
const ARRIVAL: Duration = Duration::from_secs(30);

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Call {
    signature: String,
    job: String,
    body: Vec<u8>,
}

/// A callback receiver: `POST /{name}` answers 500 to the first `fails[name]` calls, then 204.
#[derive(Clone, Default)]
struct Receiver {
    fails: Arc<HashMap<String, usize>>,
    calls: Arc<Mutex<HashMap<String, Vec<Call>>>>,
}

impl Receiver {
    async fn start(fails: &[(&str, usize)]) -> (Self, String, tokio::task::JoinHandle<()>) {
        let receiver = Receiver {
            fails: Arc::new(fails.iter().map(|(n, k)| (n.to_string(), *k)).collect()),
            calls: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/{name}", post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (receiver, url, task)
    }

    fn calls(&self, name: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    async fn wait_for(&self, name: &str, n: usize) -> Vec<Call> {
        let deadline = Instant::now() + ARRIVAL;
        while self.calls(name).len() < n {
            assert!(
                Instant::now() < deadline,
                "{n} calls to /{name} did not come"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.calls(name)
    }
}

async fn receive(
    State(r): State<Receiver>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let call = Call {
        signature: header("x-nightshift-signature"),
        job: header("x-nightshift-job"),
        body: body.to_vec(),
    };
    let mut calls = r.calls.lock().unwrap();
    let seen = calls.entry(name.clone()).or_default();
    seen.push(call);
    if seen.len() <= r.fails.get(&name).copied().unwrap_or(0) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

/// The signature the receiver expects, computed here, not by the coordinator's code.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn coordinator(f: &Fixture, secret: Option<&[u8]>) -> Api {
    let sqlite = SqliteStore::open(&f.path("state/db.sqlite")).await.unwrap();
    sqlite.migrate().await.unwrap();
    let mut config = api_server::config(AllowList::everything(), 30_000);
    config.callbacks = CallbackConfig {
        secret: secret.map(Arc::from),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        ..CallbackConfig::default()
    };
    api_server::serve(config, Arc::new(sqlite), Arc::new(Stores::default())).await
}

/// The spec of `api_server::job` named `name`, writing to its own output, calling `url`.
fn job_calling(f: &Fixture, name: &str, url: &str) -> String {
    let out = f.path("out").display().to_string();
    let spec = job(f)
        .replace("api-job", name)
        .replace(&out, &f.path(name).display().to_string());
    format!("{spec}\n[notify]\nurl = \"{url}\"\n")
}

async fn job_view(api: &Api, name: &str) -> serde_json::Value {
    let (status, text) = api.get(Some("S"), &format!("/v1/jobs/{name}")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_retried_after_500s_and_never_sent_for_a_running_job() {
    let f = Fixture::new();
    let (receiver, hook, _server) = Receiver::start(&[("failing", 2)]).await;
    let api = coordinator(&f, Some(SECRET)).await;
    for name in ["failing", "waiting"] {
        let spec = job_calling(&f, name, &format!("{hook}/{name}"));
        let (status, body) = api.submit(Some("S"), None, &spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // The first job ends: a worker fails each of its shards for good.
    let failing = job_view(&api, "failing").await;
    let worker = CoordinatorClient::new(&api.url, "W").for_worker("w");
    let leases = worker.lease("w", 64).await.unwrap().leases;
    let ids: Vec<i64> = leases.iter().map(|l| l.job_id).collect();
    assert!(ids.contains(&failing["id"].as_i64().unwrap()), "{ids:?}");
    for l in leases
        .iter()
        .filter(|l| Some(l.job_id) == failing["id"].as_i64())
    {
        worker
            .fail(
                l.lease_ref(),
                nightshift_proto::FailureClass::Permanent,
                "bad file".into(),
            )
            .await
            .unwrap();
    }
    // Two 500s, then acknowledged: three tries, each signed over the final status.
    let calls = receiver.wait_for("failing", 3).await;
    for call in &calls {
        assert_eq!(call.signature, expected_signature(&call.body));
        assert_eq!(call.job, failing["id"].to_string());
        let status: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(status["name"], "failing");
        assert_eq!(status["state"], "failed", "{status}");
        assert!(
            status["error"].as_str().unwrap().contains("bad file"),
            "{status}"
        );
    }
    let deadline = Instant::now() + ARRIVAL;
    let notify = loop {
        let view = job_view(&api, "failing").await;
        if view["notify"]["state"] == "delivered" || Instant::now() > deadline {
            break view["notify"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(notify["state"], "delivered", "{notify}");
    assert_eq!(notify["attempts"], 3, "each try is recorded: {notify}");
    assert_eq!(notify["last_status"], 204, "{notify}");
    // The other job still runs (its shards were leased, not ended): no callback, however long.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        receiver.calls("waiting").is_empty(),
        "a running job was called back"
    );
    assert_eq!(
        receiver.calls("failing").len(),
        3,
        "an acknowledged callback went again"
    );
    assert_eq!(
        job_view(&api, "waiting").await["notify"]["state"],
        "pending"
    );
    // Once cancelled it ends, and its callback goes.
    let cancel = api
        .http
        .post(format!("{}/v1/jobs/waiting/cancel", api.url))
        .bearer_auth("S")
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let calls = receiver.wait_for("waiting", 1).await;
    let status: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(status["state"], "cancelled");
    assert_eq!(calls[0].signature, expected_signature(&calls[0].body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_needs_a_secret_to_sign_it_and_an_https_url() {
    let f = Fixture::new();
    let api = coordinator(&f, None).await;
    let (status, body) = api
        .submit(
            Some("S"),
            None,
            &job_calling(&f, "unsigned", "http://127.0.0.1:9/x"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body.to_string();
    assert!(
        message.contains("notify.url") && message.contains("secret"),
        "{message}"
    );
    // Without a callback the same coordinator takes the job.
    let (status, body) = api.submit(Some("S"), None, &job(&f)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let signed = coordinator(&Fixture::new(), Some(SECRET)).await;
    let (status, body) = signed
        .submit(
            Some("S"),
            None,
            &job_calling(&f, "plain", "http://hooks.example.com/x"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body.to_string();
    assert!(
        message.contains("notify.url") && message.contains("https"),
        "{message}"
    );
}
