//! What can go wrong talking to an object store, named by the URI it concerns.

use nightshift_proto::FailureClass;

use crate::s3_refusal::S3Refusal;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported URI `{uri}`: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("`{uri}` does not exist")]
    NotFound { uri: String },
    #[error("bucket of `{uri}` does not exist")]
    NoSuchBucket { uri: String },
    #[error("access to `{uri}` denied: {message}")]
    AccessDenied { uri: String, message: String },
    /// Refused for a reason that passes (a skewed clock, expired temporary credentials).
    #[error("access to `{uri}` refused for now: {message}")]
    RefusedForNow { uri: String, message: String },
    #[error("no input files match `{uri}`")]
    NoMatch { uri: String },
    #[error("`{uri}` changed since the job was planned ({detail}); refusing to mix versions")]
    InputChanged { uri: String, detail: String },
    #[error("`{uri}` already exists")]
    AlreadyExists { uri: String },
    #[error("cannot configure object store for `{uri}`: {message}")]
    Config { uri: String, message: String },
    #[error("request about `{uri}` failed: {message}")]
    Request { uri: String, message: String },
    #[error("object store error on `{uri}`: {source}")]
    Io {
        uri: String,
        #[source]
        source: object_store::Error,
    },
}

impl StorageError {
    /// Maps an object_store error on `uri` to the error a user can act on, by the error's type
    /// alone: S3's refusals are found as `S3Refusal`, which the S3 clients' connector puts
    /// there; the rest by object_store's variants.
    pub fn from_store(uri: &str, e: object_store::Error) -> Self {
        let uri = uri.to_string();
        match S3Refusal::find(&e) {
            Some(S3Refusal::NoSuchBucket) => return StorageError::NoSuchBucket { uri },
            Some(denied @ S3Refusal::Denied { .. }) => {
                return StorageError::AccessDenied {
                    uri,
                    message: denied.to_string(),
                };
            }
            Some(passing @ S3Refusal::Passing { .. }) => {
                return StorageError::RefusedForNow {
                    uri,
                    message: passing.to_string(),
                };
            }
            None => {}
        }
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound { uri },
            object_store::Error::AlreadyExists { .. } => StorageError::AlreadyExists { uri },
            object_store::Error::Precondition { source, .. } => StorageError::InputChanged {
                uri,
                detail: source.to_string(),
            },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => StorageError::AccessDenied {
                uri,
                message: source.to_string(),
            },
            other => StorageError::Io { uri, source: other },
        }
    }

    /// Whether trying again may help. Missing things and refusals do not.
    pub fn class(&self) -> FailureClass {
        match self {
            StorageError::Io { .. } | StorageError::RefusedForNow { .. } => FailureClass::Retryable,
            _ => FailureClass::Permanent,
        }
    }
}
