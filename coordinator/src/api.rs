//! The HTTP API under `/v1`: jobs for people and services (`submit` tokens), leases for workers
//! (`worker` tokens), and `/healthz`, `/readyz`, `/metrics`. Tokens never appear in logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nightshift_metastore::SCHEDULE_KEYS;
use nightshift_proto::wire::{JobList, JobQuery, JobView, SubmitResponse};
use nightshift_proto::{ErrorBody, ErrorCode, JobSpec};

use subtle::ConstantTimeEq;
use tower_http::limit::RequestBodyLimitLayer;

use crate::api_error::ApiError;
use crate::dashboard::authorize_read;
use crate::openapi::{JobPath, SubmitErrors};
use crate::service::Service;

/// How long `/readyz` waits for the database before it answers 503.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Bearer tokens by role.
#[derive(Clone, Default)]
pub struct Tokens {
    pub submit: Vec<String>,
    pub worker: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Submit,
    Worker,
}

#[derive(Clone)]
pub struct ApiState {
    /// Shared, not copied: the state is cloned for every request.
    pub service: Arc<Service>,
    pub tokens: Arc<Tokens>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{job}", get(job))
        .route("/v1/jobs/{job}/cancel", post(cancel))
        .route("/v1/jobs/{job}/retry", post(retry))
        .route("/v1/openapi.json", get(crate::openapi::document))
        .merge(crate::worker_api::routes())
        .merge(crate::dashboard::routes())
        .merge(crate::schedule_api::routes())
        .merge(crate::fleet_api::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The largest request body the API reads. A request announcing more is refused with 413 on
/// its headers alone, before a byte of the body is read; a streamed body is cut off there.
const MAX_REQUEST_BYTES: usize = 2 << 20;

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

/// The most bytes of a plain-text error body that `json_errors` repeats.
const MAX_PLAIN_ERROR_BYTES: usize = 4096;

/// Every error answer carries the `{code, message}` body, those axum makes itself included (413
/// for a body over the limit, 405, a malformed query string).
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_PLAIN_ERROR_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let body = ErrorBody {
        code: code_for(status),
        message,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let json = serde_json::to_vec(&body).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(json))
}

/// The error code for a status no `ApiError` chose.
fn code_for(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    }
}

/// Records latency per route and logs the request (never its headers).
async fn observe(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    let took = started.elapsed();
    state.service.metrics.api(&route).observe(took);
    tracing::debug!(%method, route, status = resp.status().as_u16(), ms = took.as_millis() as u64, "request");
    resp
}

pub(crate) fn authorize(state: &ApiState, headers: &HeaderMap, need: Role) -> Result<(), ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized)?;
    authorize_token(state, token, need)
}

/// Whether `token` has the role `need`.
pub(crate) fn authorize_token(state: &ApiState, token: &str, need: Role) -> Result<(), ApiError> {
    let has = |list: &[String]| {
        list.iter()
            .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    };
    let is_submit = has(&state.tokens.submit);
    let is_worker = has(&state.tokens.worker);
    match (need, is_submit, is_worker) {
        (Role::Submit, true, _) | (Role::Worker, _, true) => Ok(()),
        (Role::Submit, false, true) => {
            Err(ApiError::Forbidden("manage jobs (it is a worker token)"))
        }
        (Role::Worker, true, false) => Err(ApiError::Forbidden(
            "act as a worker (it is a submit token)",
        )),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's case does not matter
/// (RFC 9110, 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares without returning early, so timing does not leak how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, body = String, content_type = "text/plain")))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the metastore answers and its migrations are applied.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, body = String, content_type = "text/plain"),
    (status = 503, body = ErrorBody, description = "The database is unreachable or not migrated")))]
pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    let unavailable =
        |why: &str| (StatusCode::SERVICE_UNAVAILABLE, why.to_string()).into_response();
    match tokio::time::timeout(READY_TIMEOUT, state.service.store.ready()).await {
        Ok(Ok(true)) => (StatusCode::OK, "ready").into_response(),
        Ok(Ok(false)) => unavailable("migrations not applied"),
        Ok(Err(e)) => {
            tracing::warn!(error = ?e.to_string(), "readiness check failed");
            unavailable("database unreachable")
        }
        Err(_) => unavailable("database did not answer in time"),
    }
}

/// Prometheus metrics (either token).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, body = String, content_type = "text/plain; version=0.0.4"), SubmitErrors),
    security(("submit_token" = []), ("worker_token" = [])))]
pub(crate) async fn metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)
        .or_else(|_| authorize(&state, &headers, Role::Worker))?;
    let store = state.service.store.metrics(60_000).await?;
    let mut body = state.service.metrics.render(&store);
    let mut costs = Vec::new();
    for job in state.service.store.running_jobs().await? {
        let (_, rows_done, _) = state.service.store.shard_counts(job.id).await?;
        costs.push((job.id, state.service.job_cost(&job, rows_done).await?));
    }
    body.push_str(&crate::metrics::render_costs(&costs));
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

/// Submits a job: a spec as JSON, or as TOML (`Content-Type: application/toml`). With an
/// `Idempotency-Key`, the same key and spec answer the job it made (200), another spec 409.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body(content((JobSpec = "application/json"), (String = "application/toml"))),
    params(("idempotency-key" = Option<String>, Header, description = "Makes a retried submit safe; keys starting `schedule:` are the schedules' own")),
    responses((status = 201, body = SubmitResponse, description = "Created"),
        (status = 200, body = SubmitResponse, description = "The job this key already made"),
        SubmitErrors),
    security(("submit_token" = [])))]
pub(crate) async fn submit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let spec = if content_type.contains("toml") || content_type.starts_with("text/plain") {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::BadRequest("TOML body is not UTF-8".into()))?;
        JobSpec::from_toml(text)
    } else {
        JobSpec::from_json(&body)
    }
    .map_err(ApiError::Spec)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key is not text".into()))?
                .to_string(),
        ),
        None => None,
    };
    if let Some(k) = key.as_deref().filter(|k| k.starts_with(SCHEDULE_KEYS)) {
        // A submitter could otherwise take a schedule's next fire time (same spec) or block it.
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key `{}` starts with `{SCHEDULE_KEYS}`, which names the jobs schedules \
             make; choose another",
            nightshift_proto::excerpt(k)
        )));
    }
    let resp = state.service.submit(spec, key).await?;
    let status = if resp.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(resp)).into_response())
}

/// Jobs, newest first, a page at a time, filtered.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobQuery),
    responses((status = 200, body = JobList), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<JobQuery>,
) -> Result<Json<JobList>, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(Json(state.service.list(q).await?))
}

/// One job by id or name.
#[utoipa::path(get, path = "/v1/jobs/{job}", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(Json(state.service.get(&job).await?).into_response())
}

/// Cancels a job; its leases learn it at their next heartbeat.
#[utoipa::path(post, path = "/v1/jobs/{job}/cancel", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn cancel(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.cancel(&job).await?).into_response())
}

/// Runs a failed or cancelled job's dead and unfinished shards again.
#[utoipa::path(post, path = "/v1/jobs/{job}/retry", tag = "jobs", params(JobPath),
    responses((status = 200, body = JobView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn retry(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(job): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.retry(&job).await?).into_response())
}
