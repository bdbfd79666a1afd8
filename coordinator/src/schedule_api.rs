//! `/v1/schedules`: create, list, show, pause, resume and delete schedules (submit token).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nightshift_proto::wire::{ScheduleList, ScheduleRequest};

use crate::api::{ApiState, Role, authorize};
use crate::api_error::ApiError;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/schedules", post(create).get(list))
        .route("/v1/schedules/{name}", get(show).delete(delete))
        .route("/v1/schedules/{name}/pause", post(pause))
        .route("/v1/schedules/{name}/resume", post(resume))
}

async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    let request: ScheduleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("bad schedule: {e}")))?;
    let view = state.service.create_schedule(request).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(State(state): State<ApiState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    let schedules = state.service.schedules().await?;
    Ok(Json(ScheduleList { schedules }).into_response())
}

async fn show(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.schedule(&name).await?).into_response())
}

async fn pause(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.pause_schedule(&name, true).await?).into_response())
}

async fn resume(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.pause_schedule(&name, false).await?).into_response())
}

async fn delete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    state.service.delete_schedule(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
