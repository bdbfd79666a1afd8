//! Every API error and its HTTP status, in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nightshift_proto::{ErrorBody, ErrorCode, SpecError};

use crate::job_check::JobCheckError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Spec(SpecError),
    #[error("{0}")]
    Check(JobCheckError),
    #[error("`{uri}` in {key} is not allowed: {reason}")]
    UriNotAllowed {
        key: &'static str,
        uri: String,
        reason: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or malformed bearer token")]
    Unauthorized,
    #[error("this token may not {0}")]
    Forbidden(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::Spec(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidSpec),
            ApiError::Check(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidJob),
            ApiError::UriNotAllowed { .. } => (StatusCode::FORBIDDEN, ErrorCode::UriNotAllowed),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            ApiError::Store(e) => match e {
                StoreError::LeaseLost { .. } => (StatusCode::CONFLICT, ErrorCode::LeaseLost),
                StoreError::JobNotRunning { .. }
                | StoreError::CheckpointGap { .. }
                | StoreError::Incomplete { .. }
                | StoreError::IdempotencyConflict { .. }
                | StoreError::BadTransition { .. } => (StatusCode::CONFLICT, ErrorCode::Conflict),
                StoreError::JobNotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
                // The database is away: clients retry.
                StoreError::Db(_) | StoreError::Migrate(_) | StoreError::Batch(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
                }
                StoreError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (
            status,
            Json(ErrorBody {
                code,
                message: self.to_string(),
            }),
        )
            .into_response()
    }
}
