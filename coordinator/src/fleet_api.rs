//! `/v1/fleet` and `/v1/workers/{worker}/drain`: what the fleet scaler reads and the drain it
//! asks of a worker it will remove (submit token).

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use nightshift_proto::FleetView;
use nightshift_proto::wire::Ack;

use crate::api::{ApiState, Role, authorize};
use crate::api_error::ApiError;
use crate::openapi::{SubmitErrors, WorkerPath};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/fleet", get(fleet))
        .route("/v1/workers/{worker}/drain", post(drain))
}

/// Jobs' pending rows, shards and deadlines, the workers (machines, leases, rows/s, drains)
/// and the coming scheduled runs, in one answer.
#[utoipa::path(get, path = "/v1/fleet", tag = "fleet",
    responses((status = 200, body = FleetView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn fleet(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<FleetView>, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.fleet_view().await?))
}

/// Asks a worker to drain: it takes no new shard, finishes, checkpoints and releases what it
/// holds, and exits.
#[utoipa::path(post, path = "/v1/workers/{worker}/drain", tag = "fleet", params(WorkerPath),
    responses((status = 200, body = Ack), SubmitErrors,
        (status = 404, body = nightshift_proto::ErrorBody, description = "No such worker")),
    security(("submit_token" = [])))]
pub(crate) async fn drain(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(worker): Path<String>,
) -> Result<Json<Ack>, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    state.service.drain_worker(&worker).await?;
    Ok(Json(Ack { ok: true }))
}
