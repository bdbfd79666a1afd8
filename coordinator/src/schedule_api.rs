//! `/v1/schedules`: create, list, show, pause, resume and delete schedules (submit token).

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use nightshift_proto::wire::{ScheduleList, ScheduleRequest, ScheduleView};

use crate::api::{ApiState, Role, authorize};
use crate::api_error::ApiError;
use crate::dashboard::authorize_read;
use crate::openapi::{SchedulePath, SubmitErrors};

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/schedules", post(create).get(list))
        .route("/v1/schedules/{name}", get(show).delete(delete))
        .route("/v1/schedules/{name}/pause", post(pause))
        .route("/v1/schedules/{name}/resume", post(resume))
}

/// Creates a schedule; its cron, time zone and spec variables are checked first.
#[utoipa::path(post, path = "/v1/schedules", tag = "schedules", request_body = ScheduleRequest,
    responses((status = 201, body = ScheduleView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn create(
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

/// Every schedule, with its next fire time and latest fires.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules",
    responses((status = 200, body = ScheduleList), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize_read(&state, &headers)?;
    let schedules = state.service.schedules().await?;
    Ok(Json(ScheduleList { schedules }).into_response())
}

/// One schedule.
#[utoipa::path(get, path = "/v1/schedules/{name}", tag = "schedules", params(SchedulePath),
    responses((status = 200, body = ScheduleView), SubmitErrors),
    security(("submit_token" = []), ("dashboard_cookie" = [])))]
pub(crate) async fn show(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize_read(&state, &headers)?;
    Ok(Json(state.service.schedule(&name).await?).into_response())
}

/// Stops a schedule firing until it is resumed.
#[utoipa::path(post, path = "/v1/schedules/{name}/pause", tag = "schedules", params(SchedulePath),
    responses((status = 200, body = ScheduleView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn pause(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.pause_schedule(&name, true).await?).into_response())
}

/// Lets a paused schedule fire again, from its next fire time after now; a schedule that is not
/// paused is left as it is, its due fire time included.
#[utoipa::path(post, path = "/v1/schedules/{name}/resume", tag = "schedules", params(SchedulePath),
    responses((status = 200, body = ScheduleView), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn resume(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    Ok(Json(state.service.pause_schedule(&name, false).await?).into_response())
}

/// Deletes a schedule (the jobs it made stay).
#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "schedules", params(SchedulePath),
    responses((status = 204, description = "Deleted"), SubmitErrors), security(("submit_token" = [])))]
pub(crate) async fn delete(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Role::Submit)?;
    state.service.delete_schedule(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
