//! Error codes carried in API error bodies, so clients act on a code rather than on text.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The spec does not parse or breaks a rule.
    InvalidSpec,
    /// The input, model or output does not fit the spec.
    InvalidJob,
    /// A URI outside the coordinator's allow-list.
    UriNotAllowed,
    NotFound,
    /// Same idempotency key, different spec; or a transition that no longer applies.
    Conflict,
    /// The fencing token is stale: the lease is gone.
    LeaseLost,
    /// The lease's job is no longer running (cancelled, failed or finished): stop its shards.
    JobNotRunning,
    Unauthorized,
    Forbidden,
    BadRequest,
    /// A part a worker reported is not its own, does not exist as reported, or its counts do
    /// not add up.
    InvalidPart,
    /// The request body is larger than the coordinator accepts.
    TooLarge,
    /// The route exists, but not for this method.
    MethodNotAllowed,
    Unavailable,
    Internal,
}

/// The JSON body of every API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
