//! Whose a data file is: the job its Parquet footer names (`layout::JOB_UID_KEY`) and the rows
//! it holds, from the footer alone (no row data). The rule by which the commit and merge work
//! take a file at an output name as their job's, and never one that is not.

use std::sync::Arc;

use nightshift_proto::layout::JOB_UID_KEY;
use object_store::ObjectStoreExt;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

use crate::error::StorageError;
use crate::location::Location;
use crate::object_reader::ObjectReader;

/// Why a footer was not read: the store failed (its class says whether to try again), or the
/// bytes are not a Parquet footer.
#[derive(Debug, thiserror::Error)]
pub enum FooterError {
    #[error(transparent)]
    Storage(StorageError),
    #[error("{0}")]
    NotParquet(String),
}

impl From<ParquetError> for FooterError {
    /// A storage error the reader met stays one, so that a store that blipped is never taken
    /// for a file that is not Parquet.
    fn from(e: ParquetError) -> Self {
        match e {
            ParquetError::External(inner) => match inner.downcast::<StorageError>() {
                Ok(storage) => FooterError::Storage(*storage),
                Err(other) => FooterError::NotParquet(ParquetError::External(other).to_string()),
            },
            other => FooterError::NotParquet(other.to_string()),
        }
    }
}

/// The job a Parquet file's footer names (if any) and the rows it holds.
pub async fn stamp(loc: &Location, size: u64) -> Result<(Option<String>, u64), FooterError> {
    Ok(stamp_of(&*read_footer(loc, size).await?))
}

/// The footer of the Parquet file at `loc` of `size` bytes.
pub async fn read_footer(loc: &Location, size: u64) -> Result<Arc<ParquetMetaData>, FooterError> {
    let mut reader = ObjectReader::new(loc.clone(), size, None);
    Ok(reader.footer().await?)
}

/// The job a footer names (if any) and the rows it holds.
pub fn stamp_of(footer: &ParquetMetaData) -> (Option<String>, u64) {
    let file = footer.file_metadata();
    let owner = file
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == JOB_UID_KEY))
        .and_then(|kv| kv.value.clone());
    (owner, file.num_rows().max(0) as u64)
}

/// Whether a file whose footer says `stamp` (`stamp_of`) is job `job_uid`'s file of `rows`
/// rows; if not, what it is instead.
pub fn owned_by(stamp: (Option<String>, u64), job_uid: &str, rows: u64) -> Result<(), String> {
    match stamp {
        (Some(uid), n) if uid == job_uid && n == rows => Ok(()),
        (Some(uid), n) if uid == job_uid => Err(format!(
            "this job's file of {n} rows where {rows} are planned"
        )),
        (Some(uid), _) => Err(format!("written for job {uid}")),
        (None, _) => Err("a file no nightshift job wrote".into()),
    }
}

/// What lies at an output name, for a job that would put a file of some rows there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupant {
    /// Nothing.
    Free,
    /// This job's file of those rows, of this many bytes: an earlier attempt wrote it.
    Ours { bytes: u64 },
    /// Anything else, described: never adopted, never overwritten. `owner` is the other job
    /// its footer names, if it names one.
    Foreign {
        found: String,
        owner: Option<String>,
    },
}

/// Who holds `dest`, for job `job_uid` that would put `rows` rows there.
pub async fn occupant(dest: &Location, job_uid: &str, rows: u64) -> Result<Occupant, StorageError> {
    let meta = match dest.store().head(dest.path()).await {
        Ok(meta) => meta,
        Err(object_store::Error::NotFound { .. }) => return Ok(Occupant::Free),
        Err(e) => return Err(StorageError::from_store(&dest.uri(), e)),
    };
    let (found, owner) = match stamp(dest, meta.size).await {
        Err(FooterError::Storage(e)) => return Err(e),
        Err(FooterError::NotParquet(e)) => {
            (format!("not a Parquet file this job wrote: {e}"), None)
        }
        Ok(stamp) => {
            let owner = stamp.0.clone().filter(|uid| uid != job_uid);
            match owned_by(stamp, job_uid, rows) {
                Ok(()) => return Ok(Occupant::Ours { bytes: meta.size }),
                Err(found) => (found, owner),
            }
        }
    };
    Ok(Occupant::Foreign { found, owner })
}
