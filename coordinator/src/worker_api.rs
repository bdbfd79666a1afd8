//! `/v1/worker/*`: the lease protocol (worker tokens). Every body is validated before it
//! reaches the store: workers run on less trusted machines.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nightshift_proto::wire::{
    Ack, CheckpointRequest, CompleteManyRequest, CompleteManyResponse, CompleteRequest,
    FailRequest, HeartbeatRequest, HeartbeatResponse, LeaseRequest, LeaseResponse, ReleaseRequest,
};

use crate::api::{ApiState, Role, authorize};
use crate::api_error::ApiError;
use crate::openapi::WorkerErrors;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/worker/lease", post(lease))
        .route("/v1/worker/heartbeat", post(heartbeat))
        .route("/v1/worker/checkpoint", post(checkpoint))
        .route("/v1/worker/complete", post(complete))
        .route("/v1/worker/complete-many", post(complete_many))
        .route("/v1/worker/fail", post(fail))
        .route("/v1/worker/release", post(release))
        .route("/v1/worker/specs/{hash}", get(spec))
}

/// Parses a worker request body, answering 400 (not 422) to anything malformed.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad request body: {e}")))
}

/// Up to `max` shards for this worker, each with a fencing token and a secret.
#[utoipa::path(post, path = "/v1/worker/lease", tag = "worker", request_body = LeaseRequest,
    responses((status = 200, body = LeaseResponse), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn lease(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: LeaseRequest = parse(&body)?;
    Ok(Json(state.service.lease(&req).await?).into_response())
}

/// Extends every lease still held; says which are lost or cancelled.
#[utoipa::path(post, path = "/v1/worker/heartbeat", tag = "worker", request_body = HeartbeatRequest,
    responses((status = 200, body = HeartbeatResponse), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn heartbeat(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: HeartbeatRequest = parse(&body)?;
    Ok(Json(state.service.heartbeat(&req).await?).into_response())
}

/// Records one output part of a leased shard.
#[utoipa::path(post, path = "/v1/worker/checkpoint", tag = "worker", request_body = CheckpointRequest,
    responses((status = 200, body = Ack), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn checkpoint(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: CheckpointRequest = parse(&body)?;
    state
        .service
        .checkpoint(&req.worker_id, req.lease, &req.part, req.batch_rows)
        .await?;
    Ok(Json(Ack { ok: true }))
}

/// Marks a leased shard done.
#[utoipa::path(post, path = "/v1/worker/complete", tag = "worker", request_body = CompleteRequest,
    responses((status = 200, body = Ack), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn complete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: CompleteRequest = parse(&body)?;
    state.service.complete(&req.worker_id, req.lease).await?;
    Ok(Json(Ack { ok: true }))
}

/// Marks many leased shards done; answers per lease.
#[utoipa::path(post, path = "/v1/worker/complete-many", tag = "worker", request_body = CompleteManyRequest,
    responses((status = 200, body = CompleteManyResponse), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn complete_many(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<CompleteManyResponse>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: CompleteManyRequest = parse(&body)?;
    let answers = state
        .service
        .complete_many(&req.worker_id, &req.leases)
        .await?;
    Ok(Json(CompleteManyResponse {
        results: answers
            .into_iter()
            .map(|answer| answer.err().map(|e| e.body()))
            .collect(),
    }))
}

/// Reports a failed shard: retried with backoff, or dead.
#[utoipa::path(post, path = "/v1/worker/fail", tag = "worker", request_body = FailRequest,
    responses((status = 200, body = Ack), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn fail(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: FailRequest = parse(&body)?;
    state
        .service
        .fail(
            &req.worker_id,
            req.lease,
            req.class,
            &req.message,
            req.taken_by.as_deref(),
        )
        .await?;
    Ok(Json(Ack { ok: true }))
}

/// Gives a lease back unfinished (drain); the attempt does not count.
#[utoipa::path(post, path = "/v1/worker/release", tag = "worker", request_body = ReleaseRequest,
    responses((status = 200, body = Ack), WorkerErrors), security(("worker_token" = [])))]
pub(crate) async fn release(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Ack>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    let req: ReleaseRequest = parse(&body)?;
    state.service.release(&req.worker_id, req.lease).await?;
    Ok(Json(Ack { ok: true }))
}

/// The spec of a job that has not ended, by the hash lease answers name it by.
#[utoipa::path(get, path = "/v1/worker/specs/{hash}", tag = "worker",
    params(("hash" = String, Path, description = "`spec_hash` of a lease grant: 64 hex digits")),
    responses((status = 200, body = nightshift_proto::JobSpec), WorkerErrors,
        (status = 404, body = nightshift_proto::ErrorBody, description = "No job that has not ended has this spec")),
    security(("worker_token" = [])))]
pub(crate) async fn spec(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(hash): Path<String>,
) -> Result<Json<nightshift_proto::JobSpec>, ApiError> {
    authorize(&state, &headers, Role::Worker)?;
    Ok(Json(state.service.spec(&hash).await?))
}
