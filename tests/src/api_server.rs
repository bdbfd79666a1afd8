//! A coordinator in this process (real HTTP on 127.0.0.1, a real SQLite or PostgreSQL store)
//! and a client for its API, for tests that drive the API by hand.

use std::sync::Arc;

use nightshift_coordinator::{AllowList, Coordinator, CoordinatorConfig};
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_metastore::{DynMetastore, LeaseTiming, Metastore};
use nightshift_storage::Stores;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::fixtures::{Fixture, spec_toml};

/// How often `wait_succeeded` looks at a job.
const JOB_POLL: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
    stop: CancellationToken,
    _task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A coordinator on a SQLite store in the fixture, with submit token `S` and worker token `W`.
pub async fn start(f: &Fixture, allow: AllowList, ttl_ms: i64) -> Api {
    let sqlite = SqliteStore::open(&f.path("state/db.sqlite")).await.unwrap();
    sqlite.migrate().await.unwrap();
    start_on(Arc::new(sqlite), allow, ttl_ms).await
}

/// A coordinator on `store`, with submit token `S` and worker token `W`.
pub async fn start_on(store: DynMetastore, allow: AllowList, ttl_ms: i64) -> Api {
    start_with(store, allow, ttl_ms, Arc::new(Stores::default())).await
}

/// As `start_on`, reaching objects through `stores`.
pub async fn start_with(
    store: DynMetastore,
    allow: AllowList,
    ttl_ms: i64,
    stores: Arc<Stores>,
) -> Api {
    serve(config(allow, ttl_ms), store, stores).await
}

/// The config `start` serves with: submit token `S`, worker token `W`, short backoffs.
pub fn config(allow: AllowList, ttl_ms: i64) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap());
    config.submit_tokens = vec!["S".into()];
    config.worker_tokens = vec!["W".into()];
    config.allow = allow;
    config.timing = LeaseTiming {
        ttl_ms,
        backoff_base_ms: 10,
        backoff_max_ms: 100,
    };
    config
}

/// A coordinator with `config` (its listen address aside) on `store`.
pub async fn serve(config: CoordinatorConfig, store: DynMetastore, stores: Arc<Stores>) -> Api {
    let c = Coordinator::new(config, store, stores);
    let listener = c.bind().await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.run(listener, stop.clone()));
    Api {
        url,
        http: reqwest::Client::new(),
        stop,
        _task: task,
    }
}

/// The spec of a small job over generated data (2,000 rows, 4 shards) with output `out`.
pub fn job(f: &Fixture) -> String {
    let data = f.data(
        "in",
        &["--rows", "2000", "--files", "2", "--row-group-rows", "500"],
    );
    let model = f.model("m.onnx", &["--hidden", "16"]);
    spec_toml(
        "api-job",
        &format!("{}/*.parquet", data.display()),
        &model,
        &f.path("out"),
        "[shards]\nrows = 500\n",
    )
}

impl Api {
    pub async fn submit(
        &self,
        token: Option<&str>,
        key: Option<&str>,
        toml: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .header("content-type", "application/toml")
            .body(toml.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Waits until job `name` has succeeded; panics if it ends otherwise or not within `limit`.
    pub async fn wait_succeeded(&self, name: &str, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let (_, text) = self.get(Some("S"), &format!("/v1/jobs/{name}")).await;
            let view: serde_json::Value = serde_json::from_str(&text).unwrap();
            match view["state"].as_str() {
                Some("succeeded") => return,
                Some("failed" | "cancelled") => panic!("job {name} ended badly: {view}"),
                _ => assert!(
                    std::time::Instant::now() < deadline,
                    "job {name} did not end: {view}"
                ),
            }
            tokio::time::sleep(JOB_POLL).await;
        }
    }

    pub async fn get(&self, token: Option<&str>, path: &str) -> (StatusCode, String) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }

    /// A POST without a body (cancel, retry) under `token`.
    pub async fn post(&self, token: &str, path: &str) -> (StatusCode, String) {
        let url = format!("{}{path}", self.url);
        let resp = self.http.post(url).bearer_auth(token).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }
}
