//! Why a shard run failed, and whether trying again may help (the coordinator acts on the
//! class: retryable errors back off and retry, permanent ones go dead at once).

use nightshift_proto::FailureClass;
use nightshift_storage::StorageError;
use parquet::errors::ParquetError;

use crate::client::ClientError;
use crate::model_session::ModelError;
use crate::onnx_runtime::RuntimeError;
use crate::tensors::TensorError;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("reading `{uri}`: {message}")]
    Read {
        uri: String,
        message: String,
        class: FailureClass,
    },
    #[error("input `{uri}` does not fit the job: {message}")]
    Schema { uri: String, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("inference failed: {0}")]
    Tensor(#[from] TensorError),
    #[error("writing part `{uri}`: {message}")]
    Write { uri: String, message: String },
    #[error(
        "`{uri}` already exists and is not this job's ({found}); a job never overwrites a file \
         it did not write: remove it, or choose another output"
    )]
    Taken {
        uri: String,
        found: String,
        /// The other job the file's footer names, if it names one.
        owner: Option<String>,
    },
    #[error(transparent)]
    Coordinator(#[from] ClientError),
    #[error("internal: {0}")]
    Internal(String),
}

impl ShardError {
    pub fn class(&self) -> FailureClass {
        match self {
            ShardError::Storage(e) => e.class(),
            ShardError::Read { class, .. } => *class,
            ShardError::Schema { .. } => FailureClass::Permanent,
            ShardError::Model(ModelError::Load { .. }) => FailureClass::Permanent,
            // Another worker may have the GPU or the library this one lacks.
            ShardError::Model(ModelError::CudaUnavailable { .. }) => FailureClass::Retryable,
            ShardError::Runtime(_) => FailureClass::Retryable,
            ShardError::Inference(_) | ShardError::Tensor(_) => FailureClass::Retryable,
            ShardError::Write { .. } => FailureClass::Retryable,
            ShardError::Taken { .. } => FailureClass::Permanent,
            ShardError::Coordinator(_) => FailureClass::Retryable,
            ShardError::Internal(_) => FailureClass::Retryable,
        }
    }

    /// The other job whose file at an output name this shard's merge work met, as the
    /// failure report's `taken_by` (the coordinator retries when that job was cancelled).
    pub fn taken_by(&self) -> Option<&str> {
        match self {
            ShardError::Taken { owner, .. } => owner.as_deref(),
            _ => None,
        }
    }

    /// A Parquet error while reading `uri`: storage trouble keeps its class; anything else
    /// (a bad footer, a corrupt page) is the file's fault and permanent.
    pub fn from_parquet(uri: &str, e: ParquetError) -> Self {
        if let Some(s) = nightshift_storage::storage_cause(&e) {
            return ShardError::Read {
                uri: uri.to_string(),
                message: s.to_string(),
                class: s.class(),
            };
        }
        ShardError::Read {
            uri: uri.to_string(),
            message: format!("corrupt Parquet data: {e}"),
            class: FailureClass::Permanent,
        }
    }

    /// The lease is gone (expired and granted elsewhere, or the job stopped): stop quietly.
    pub fn is_lease_lost(&self) -> bool {
        matches!(
            self,
            ShardError::Coordinator(ClientError::LeaseLost(_) | ClientError::JobNotRunning(_))
        )
    }
}
