//! Every API error and its HTTP status, in one place.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nightshift_proto::{ErrorBody, ErrorCode, SpecError, TextError};

use crate::job_check::JobCheckError;
use crate::part_check::PartError;
use nightshift_metastore::StoreError;

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
    Text(#[from] TextError),
    #[error("part refused: {0}")]
    Part(#[from] PartError),
    #[error(transparent)]
    Metastore(#[from] StoreError),
}

/// The most characters of an error message a client is sent.
const MAX_MESSAGE_CHARS: usize = 2000;

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
            ApiError::Text(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ApiError::Part(e) if e.is_storage() => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
            }
            ApiError::Part(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidPart),
            ApiError::Metastore(e) => match e {
                StoreError::LeaseLost { .. } => (StatusCode::CONFLICT, ErrorCode::LeaseLost),
                StoreError::JobNotRunning { .. } => {
                    (StatusCode::CONFLICT, ErrorCode::JobNotRunning)
                }
                StoreError::CheckpointGap { .. }
                | StoreError::Incomplete { .. }
                | StoreError::IdempotencyConflict { .. }
                | StoreError::OutputTaken { .. }
                | StoreError::BadTransition { .. }
                | StoreError::FilesRemoved(_)
                | StoreError::ScheduleExists(_) => (StatusCode::CONFLICT, ErrorCode::Conflict),
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

impl ApiError {
    /// What the client is told: the message, unless it would disclose the database's own
    /// text (that goes to the log), cut to `MAX_MESSAGE_CHARS`.
    pub fn client_message(&self) -> String {
        let message = match self {
            ApiError::Metastore(
                StoreError::Db(_)
                | StoreError::Migrate(_)
                | StoreError::Batch(_)
                | StoreError::Corrupt(_),
            ) => "the coordinator's database is unavailable; retry later".to_string(),
            other => other.to_string(),
        };
        truncate(message)
    }

    /// The error as the JSON body every API error has.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.status_and_code().1,
            message: self.client_message(),
        }
    }
}

fn truncate(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}... (message cut)", &message[..cut]),
        None => message,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = ?self.to_string(), "request failed");
        }
        (status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_are_logged_not_told_and_long_messages_are_cut() {
        let db = ApiError::Metastore(StoreError::Db(sqlx::Error::Protocol(
            "invalid byte sequence for encoding \"UTF8\": 0x00".into(),
        )));
        assert_eq!(db.status_and_code().0, StatusCode::SERVICE_UNAVAILABLE);
        let told = db.client_message();
        assert!(!told.contains("0x00") && !told.contains("UTF8"), "{told}");
        assert!(told.contains("database is unavailable"), "{told}");
        let long = ApiError::BadRequest("x".repeat(10 * MAX_MESSAGE_CHARS));
        assert!(long.client_message().chars().count() < MAX_MESSAGE_CHARS + 40);
    }
}
