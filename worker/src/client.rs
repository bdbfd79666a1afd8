//! The worker's side of the HTTP API: lease, heartbeat, checkpoint, complete, fail, release.
//! Transient failures (coordinator unreachable, restarting, 5xx) are retried with backoff, so a
//! coordinator restart mid-job costs a pause, not the job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use nightshift_proto::wire::{
    Ack, CheckpointRequest, CompleteManyRequest, CompleteManyResponse, CompleteRequest,
    FailRequest, GpuSample, HeartbeatRequest, HeartbeatResponse, LeaseGrant, LeaseRef,
    LeaseRequest, LeaseResponse, LoadedModel, PartRecord, ReleaseRequest, ShardLease,
};
use nightshift_proto::{ErrorBody, ErrorCode, FailureClass, JobSpec};
use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("coordinator unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("lease lost: {0}")]
    LeaseLost(String),
    #[error("job not running: {0}")]
    JobNotRunning(String),
    #[error("the coordinator sent a spec whose hash is not {0}")]
    SpecMismatch(String),
    #[error("coordinator refused {path} ({status}): {message}")]
    Refused {
        path: String,
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
}

impl ClientError {
    /// Of a claim: the coordinator refuses the worker itself, not one request: its token
    /// (401), its role (403), what the claim says about it (400: its id, slots, GPUs or
    /// machine), or the claim's route is not there (404, 405: the coordinator URL names
    /// something else, such as a path after the host). No retry changes that.
    pub fn refuses_worker(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if matches!(status, 400 | 401 | 403 | 404 | 405))
    }

    fn transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A coordinator endpoint and the worker token.
#[derive(Clone)]
pub struct CoordinatorClient {
    http: reqwest::Client,
    base: String,
    token: String,
    /// The worker whose leases this client writes (`for_worker`).
    worker_id: String,
    retry: ExponentialBuilder,
    /// Job specs by hash, as leases name them.
    specs: Arc<Mutex<HashMap<String, JobSpec>>>,
}

/// Specs a client keeps (it forgets them all when full).
const MAX_CACHED_SPECS: usize = 256;

/// Granted shards with their specs, and how long a lease lives without a heartbeat.
pub struct Leases {
    pub leases: Vec<ShardLease>,
    pub lease_ttl_ms: u64,
    /// The coordinator asks this worker to drain.
    pub drain: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CoordinatorClient {
    pub fn new(base: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default();
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            worker_id: String::new(),
            // About a minute of retries: long enough to ride out a coordinator restart.
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(3))
                .with_max_times(25)
                .with_jitter(),
            specs: Default::default(),
        }
    }

    /// Writes leases as the worker `worker_id` (the one that leased them).
    pub fn for_worker(mut self, worker_id: &str) -> Self {
        self.worker_id = worker_id.to_string();
        self
    }

    /// Retries for at most about `total` (heartbeats give up sooner and try on the next tick).
    pub fn with_retry_times(mut self, times: usize) -> Self {
        self.retry = self.retry.with_max_times(times);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request, built by `build` from the client and the URL, and its JSON answer.
    async fn send_once<R: DeserializeOwned>(
        &self,
        path: &str,
        build: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<R, ClientError> {
        let url = format!("{}{}", self.base, path);
        let resp = build(&self.http, &url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: error_chain(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            return resp
                .json::<R>()
                .await
                .map_err(|e| ClientError::Unreachable {
                    url,
                    reason: format!("bad response body: {}", error_chain(&e)),
                });
        }
        let text = resp.text().await.unwrap_or_default();
        let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
        let message = body.as_ref().map(|b| b.message.clone()).unwrap_or(text);
        Err(refusal(
            path,
            status.as_u16(),
            body.map(|b| b.code),
            message,
        ))
    }

    async fn post<B: Serialize + Sync, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        (|| self.send_once(path, |http, url| http.post(url).json(body)))
            .retry(self.retry)
            .when(ClientError::transient)
            .notify(|e, wait| {
                tracing::warn!(path, error = %e, wait_ms = wait.as_millis() as u64, "retrying coordinator call")
            })
            .await
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        (|| self.send_once(path, |http, url| http.get(url)))
            .retry(self.retry)
            .when(ClientError::transient)
            .await
    }

    /// Up to `max` shards, each with its job's spec (fetched once per spec and kept).
    pub async fn lease(&self, worker_id: &str, max: u32) -> Result<Leases, ClientError> {
        self.lease_with(&LeaseRequest {
            worker_id: worker_id.to_string(),
            max,
            instance: None,
            slots: None,
            gpus: None,
        })
        .await
    }

    /// A lease request that also says what the worker runs on. A grant whose spec cannot be
    /// had (the job ended meanwhile, the coordinator went away, a spec this worker cannot read)
    /// is failed as retryable with why, so that its shard goes back to the queue after the
    /// backoff and shows the reason; the other grants are answered.
    pub async fn lease_with(&self, request: &LeaseRequest) -> Result<Leases, ClientError> {
        let answer: LeaseResponse = self.post("/v1/worker/lease", request).await?;
        let mut leases = Vec::with_capacity(answer.leases.len());
        for grant in answer.leases {
            match self.spec(&grant.spec_hash).await {
                Ok(spec) => leases.push(ShardLease { grant, spec }),
                Err(e) => self.give_back(&grant, &e).await,
            }
        }
        Ok(Leases {
            leases,
            lease_ttl_ms: answer.lease_ttl_ms,
            drain: answer.drain,
        })
    }

    /// Fails a grant this worker cannot run for want of its spec (`why`).
    async fn give_back(&self, grant: &LeaseGrant, why: &ClientError) {
        tracing::warn!(job = grant.job_id, shard = grant.shard_id, error = %why, "no spec for a granted shard; failing its lease");
        let message = format!("the worker could not read the job's spec: {why}");
        let failed = self
            .fail(grant.lease_ref(), FailureClass::Retryable, message)
            .await;
        if let Err(e) = failed {
            tracing::warn!(shard = grant.shard_id, error = %e, "failing the lease failed; it expires");
        }
    }

    /// The spec of hash `hash`, from the cache or the coordinator; one whose hash is not
    /// `hash` is refused.
    async fn spec(&self, hash: &str) -> Result<JobSpec, ClientError> {
        if let Some(spec) = lock(&self.specs).get(hash) {
            return Ok(spec.clone());
        }
        let spec: JobSpec = self.get(&format!("/v1/worker/specs/{hash}")).await?;
        if spec.hash() != hash {
            return Err(ClientError::SpecMismatch(hash.to_string()));
        }
        let mut specs = lock(&self.specs);
        if specs.len() >= MAX_CACHED_SPECS {
            specs.clear();
        }
        specs.insert(hash.to_string(), spec.clone());
        Ok(spec)
    }

    pub async fn heartbeat(
        &self,
        worker_id: &str,
        leases: Vec<LeaseRef>,
        gpus: Vec<GpuSample>,
        models: Vec<LoadedModel>,
        slots: Option<u32>,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post(
            "/v1/worker/heartbeat",
            &HeartbeatRequest {
                worker_id: worker_id.to_string(),
                leases,
                gpus,
                models,
                slots,
            },
        )
        .await
    }

    /// Records a part; `batch_rows` is the rows per model call in use, for the job's status.
    pub async fn checkpoint(
        &self,
        lease: LeaseRef,
        part: PartRecord,
        batch_rows: Option<u64>,
    ) -> Result<(), ClientError> {
        let _: Ack = self
            .post(
                "/v1/worker/checkpoint",
                &CheckpointRequest {
                    worker_id: self.worker_id.clone(),
                    lease,
                    part,
                    batch_rows,
                },
            )
            .await?;
        Ok(())
    }

    pub async fn complete(&self, lease: LeaseRef) -> Result<(), ClientError> {
        let _: Ack = self
            .post(
                "/v1/worker/complete",
                &CompleteRequest {
                    worker_id: self.worker_id.clone(),
                    lease,
                },
            )
            .await?;
        Ok(())
    }

    /// Completes several shards in one request (at most 256): one answer per lease, in order,
    /// each what `complete` would have answered. Only a failure of the request itself is the
    /// outer error.
    pub async fn complete_many(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        const PATH: &str = "/v1/worker/complete-many";
        let n = leases.len();
        let request = CompleteManyRequest {
            worker_id: self.worker_id.clone(),
            leases,
        };
        let resp: CompleteManyResponse = self.post(PATH, &request).await?;
        if resp.results.len() != n {
            return Err(ClientError::Unreachable {
                url: format!("{}{PATH}", self.base),
                reason: format!("{} answers to {n} leases", resp.results.len()),
            });
        }
        Ok(resp
            .results
            .into_iter()
            .map(|answer| match answer {
                None => Ok(()),
                // Each refusal is what `/v1/worker/complete` would have answered with 409.
                Some(body) => Err(refusal(PATH, 409, Some(body.code), body.message)),
            })
            .collect())
    }

    pub async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: String,
    ) -> Result<(), ClientError> {
        self.fail_taken(lease, class, message, None).await
    }

    /// As `fail`, naming the job whose file at an output name the merge work met
    /// (`FailRequest::taken_by`).
    pub async fn fail_taken(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: String,
        taken_by: Option<String>,
    ) -> Result<(), ClientError> {
        let _: Ack = self
            .post(
                "/v1/worker/fail",
                &FailRequest {
                    worker_id: self.worker_id.clone(),
                    lease,
                    class,
                    message,
                    taken_by,
                },
            )
            .await?;
        Ok(())
    }

    pub async fn release(&self, lease: LeaseRef) -> Result<(), ClientError> {
        let _: Ack = self
            .post(
                "/v1/worker/release",
                &ReleaseRequest {
                    worker_id: self.worker_id.clone(),
                    lease,
                },
            )
            .await?;
        Ok(())
    }
}

/// The error for a refused call, from the status and the error body's code and message.
fn refusal(path: &str, status: u16, code: Option<ErrorCode>, message: String) -> ClientError {
    match code {
        Some(ErrorCode::LeaseLost) => ClientError::LeaseLost(message),
        Some(ErrorCode::JobNotRunning) => ClientError::JobNotRunning(message),
        code => ClientError::Refused {
            path: path.to_string(),
            status,
            code,
            message,
        },
    }
}

/// An error and its sources on one line (reqwest hides the cause in its sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::Json;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use nightshift_proto::wire::{InputFile, LeaseSecret, ShardPlan};

    use super::*;

    const SPEC: &str = r#"name = "j"
[input]
uri = "/in/*.parquet"
[model]
uri = "/m.onnx"
[model.inputs]
x = "features"
[model.outputs]
logits = "logits"
[output]
uri = "/out"
"#;

    fn grant(shard_id: i64, spec_hash: &str) -> LeaseGrant {
        LeaseGrant {
            job_id: shard_id,
            job_uid: format!("uid{shard_id}"),
            shard_id,
            token: 1,
            secret: LeaseSecret::from_u128(7),
            attempt: 1,
            file: InputFile {
                uri: "/in/a.parquet".into(),
                size: 10,
                etag: None,
            },
            plan: ShardPlan {
                file_index: 0,
                row_group_start: 0,
                row_group_end: 1,
                file_row_start: 0,
                rows: 10,
            },
            checkpoint_rows: 0,
            spec_hash: spec_hash.into(),
            merge: None,
            merge_files: None,
        }
    }

    /// A coordinator that grants shard 1 of a job whose spec it serves and shard 2 of one whose
    /// spec it no longer has, and records the leases failed.
    async fn coordinator(spec: JobSpec) -> (String, Arc<Mutex<Vec<FailRequest>>>) {
        let failed = Arc::new(Mutex::new(Vec::new()));
        let hash = spec.hash();
        let leases = vec![grant(1, &hash), grant(2, "0123")];
        let app = axum::Router::new()
            .route(
                "/v1/worker/lease",
                post(move || async move {
                    Json(LeaseResponse {
                        leases,
                        lease_ttl_ms: 30_000,
                        drain: false,
                    })
                }),
            )
            .route(
                "/v1/worker/specs/{hash}",
                get(move |Path(asked): Path<String>| async move {
                    if asked == spec.hash() {
                        Ok(Json(spec))
                    } else {
                        Err(StatusCode::NOT_FOUND)
                    }
                }),
            )
            .route(
                "/v1/worker/fail",
                post(
                    |State(failed): State<Arc<Mutex<Vec<FailRequest>>>>,
                     Json(req): Json<FailRequest>| async move {
                        failed.lock().unwrap().push(req);
                        Json(Ack { ok: true })
                    },
                ),
            )
            .with_state(failed.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, failed)
    }

    #[tokio::test]
    async fn a_grant_whose_spec_cannot_be_had_is_failed_and_the_others_are_kept() {
        let spec = JobSpec::from_toml(SPEC).unwrap();
        let (url, failed) = coordinator(spec.clone()).await;
        let client = CoordinatorClient::new(&url, "W")
            .for_worker("w1")
            .with_retry_times(0);
        let leases = client
            .lease("w1", 2)
            .await
            .expect("the spec that exists is used");
        let shards: Vec<i64> = leases.leases.iter().map(|l| l.grant.shard_id).collect();
        assert_eq!(shards, [1]);
        assert_eq!(leases.leases[0].spec, spec);
        let failed = failed.lock().unwrap();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].lease.shard_id, 2);
        assert_eq!(failed[0].class, FailureClass::Retryable);
        assert!(failed[0].message.contains("spec"), "{}", failed[0].message);
    }
}
