//! Commit: when every shard is done, workers have already made the output files (merge work,
//! `merges.rs`: each about `output.target_file_mb`); the commit reads no row data. It puts
//! each merged file whole under its output name (a server-side copy on S3, a rename locally:
//! `publish_object`), writes `_manifest.json` and then `_SUCCESS`, and the parts are deleted.
//! Every step is idempotent, so a crash mid-commit and a second run produce the same manifest:
//! an output file an earlier attempt published is kept (its source may be gone, moved).
//!
//! The commit adopts nothing it cannot prove its own (`ownership.rs`): a file already at an
//! output name is kept only when its footer names this job (`layout::JOB_UID_KEY`) and holds
//! the planned rows, and a manifest is overwritten only when it is this job's. Every part is
//! checked before anything is written: one that is missing, of another size, not a plain file
//! in the job's parts directory, or whose footer does not name the job and its rows, fails the
//! commit for good, naming it. Before `_manifest.json` and `_SUCCESS` the finalizer renews its
//! claim, so a job cancelled mid-commit is not published.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_schema::SchemaRef;
use futures::{StreamExt, TryStreamExt};
use nightshift_proto::layout::{
    ERROR_FILE_STEM, MANIFEST, OUTPUT_FILE_STEM, SUCCESS, data_file, parts_dir,
};
use nightshift_proto::wire::{CostView, InputFile, Manifest, ManifestField, ManifestFile};
use nightshift_storage::{
    Location, ObjectReader, StorageError, Stores, publish_object, sync_local,
};
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};

use crate::ownership::{check_manifest_owner, owned_file, verify_parts};
use crate::part_check::PartError;
use nightshift_metastore::{DynMetastore, JobRecord, PartRow};

/// A point where crash tests stop the process, for real (the only way to land a crash exactly
/// between two commit steps): with the `failpoints` feature and `FAILPOINTS=NAME=return`
/// (`failpoints_from_env`); nothing at all in other builds.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            eprintln!("crash point {}: aborting", $name);
            std::process::abort()
        })
    };
}

/// Output files written at once.
const FILE_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("part `{uri}` cannot be committed: {message}")]
    Part { uri: String, message: String },
    #[error("writing `{uri}`: {message}")]
    Write { uri: String, message: String },
    #[error("output of job {job} is incomplete: {message}")]
    Incomplete { job: i64, message: String },
    #[error(
        "`{uri}` already exists and is not this job's ({found}); the commit never adopts a file \
         it did not write"
    )]
    Foreign { uri: String, found: String },
    #[error("the commit's claim on the job is gone (cancelled, or taken by another replica)")]
    ClaimLost,
}

impl FinalizeError {
    /// Worth another try later (the object store blipped), or not.
    pub fn is_retryable(&self) -> bool {
        match self {
            FinalizeError::Storage(e) => e.class() == nightshift_proto::FailureClass::Retryable,
            FinalizeError::Write { .. } | FinalizeError::ClaimLost => true,
            FinalizeError::Part { .. }
            | FinalizeError::Incomplete { .. }
            | FinalizeError::Foreign { .. } => false,
        }
    }

    pub(crate) fn part(uri: &str, e: PartError) -> Self {
        match e {
            PartError::Storage(e) => FinalizeError::Storage(e),
            other => FinalizeError::Part {
                uri: uri.to_string(),
                message: other.to_string(),
            },
        }
    }
}

/// The finalizer's claim on the job it commits: checked before each step that publishes.
pub struct Claim<'a> {
    pub store: &'a DynMetastore,
    pub job: i64,
    pub owner: &'a str,
    pub ttl_ms: i64,
}

impl Claim<'_> {
    /// Renews the claim; `ClaimLost` when the job is no longer this finalizer's to commit.
    async fn renew(&self) -> Result<(), FinalizeError> {
        match self
            .store
            .extend_finalize(self.job, self.owner, self.ttl_ms)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(FinalizeError::ClaimLost),
            Err(e) => Err(FinalizeError::Write {
                uri: format!("job {}", self.job),
                message: e.to_string(),
            }),
        }
    }
}

/// One output file: a whole merged file, copied under its output name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    pub path: String,
    /// URI of the merged file.
    pub source: String,
    pub rows: u64,
}

/// One output file per merged file that has rows, named in order.
pub fn plan_files(parts: &[(String, u64)], stem: &str) -> Vec<FilePlan> {
    parts
        .iter()
        .filter(|(_, rows)| *rows > 0)
        .enumerate()
        .map(|(i, (uri, rows))| FilePlan {
            path: data_file(stem, i),
            source: uri.clone(),
            rows: *rows,
        })
        .collect()
}

/// What finalizing wrote.
#[derive(Debug, Clone)]
pub struct Committed {
    pub manifest: Manifest,
}

/// Commits a job whose shards are all done.
pub async fn finalize(
    stores: &Stores,
    job: &JobRecord,
    parts: &[PartRow],
    inputs: Vec<InputFile>,
    cost: CostView,
    claim: &Claim<'_>,
) -> Result<Committed, FinalizeError> {
    let out = stores.locate(&job.output_uri)?;
    check_coverage(job, parts)?;
    let output_parts: Vec<(String, u64)> = parts
        .iter()
        .map(|p| (p.uri.clone(), p.rows - p.error_rows))
        .collect();
    let error_parts: Vec<(String, u64)> = parts
        .iter()
        .filter_map(|p| p.error_uri.clone().map(|u| (u, p.error_rows)))
        .collect();
    let files = plan_files(&output_parts, OUTPUT_FILE_STEM);
    let error_files = plan_files(&error_parts, ERROR_FILE_STEM);
    // Files an earlier attempt published are kept; every other source is checked before
    // anything is written.
    let all: Vec<FilePlan> = files.iter().chain(&error_files).cloned().collect();
    let published = published_files(&out, &job.uid, &all).await?;
    let sources_left: HashSet<String> = all
        .iter()
        .filter(|f| !published.contains_key(&f.path))
        .map(|f| f.source.clone())
        .collect();
    verify_parts(&out, job, parts, &sources_left).await?;
    let written = write_files(stores, &out, &files, &published).await?;
    let errors_written = write_files(stores, &out, &error_files, &published).await?;
    let schema = match (files.first(), parts.first()) {
        (Some(f), _) => schema_of(stores, &out.join(&f.path).uri()).await?,
        (None, Some(p)) => schema_of(stores, &p.uri).await?,
        (None, None) => Arc::new(arrow_schema::Schema::empty()),
    };
    let error_rows: u64 = parts.iter().map(|p| p.error_rows).sum();
    let manifest = Manifest {
        job: job.name.clone(),
        job_uid: job.uid.clone(),
        spec_hash: job.spec_hash.clone(),
        total_rows: written.iter().map(|f| f.rows).sum(),
        input_rows: job.rows_total,
        error_rows,
        files: written,
        error_files: errors_written,
        schema: schema
            .fields()
            .iter()
            .map(|f| ManifestField {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
                nullable: f.is_nullable(),
            })
            .collect(),
        input_snapshot: inputs,
        cost: Some(cost),
    };
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| FinalizeError::Write {
        uri: out.join(MANIFEST).uri(),
        message: e.to_string(),
    })?;
    crash_point!("finalize-before-manifest");
    check_manifest_owner(&out.join(MANIFEST), &job.uid).await?;
    claim.renew().await?;
    put(&out.join(MANIFEST), body).await?;
    crash_point!("finalize-before-success");
    claim.renew().await?;
    put(&out.join(SUCCESS), Vec::new()).await?;
    Ok(Committed { manifest })
}

/// The parts cover the job's rows exactly, and no part counts more error rows than rows.
fn check_coverage(job: &JobRecord, parts: &[PartRow]) -> Result<(), FinalizeError> {
    if let Some(p) = parts.iter().find(|p| p.error_rows > p.rows) {
        return Err(FinalizeError::Part {
            uri: p.uri.clone(),
            message: format!("{} error rows of {} rows", p.error_rows, p.rows),
        });
    }
    let covered = parts
        .iter()
        .try_fold(0u64, |sum, p| sum.checked_add(p.rows));
    if covered != Some(job.rows_total) {
        return Err(FinalizeError::Incomplete {
            job: job.id,
            message: format!(
                "parts cover {} of {} rows",
                covered.map_or("more than 2^64".into(), |c| c.to_string()),
                job.rows_total
            ),
        });
    }
    Ok(())
}

/// What `collect_garbage` removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Garbage {
    /// Part objects deleted.
    pub objects: usize,
    /// Multipart uploads aborted: parts of workers that died mid-upload.
    pub uploads: usize,
}

/// Deletes a job's parts (all of them are in the output files or are garbage from fenced
/// leases) and aborts the multipart uploads left open under them by workers that died
/// mid-part, which S3 would otherwise keep and bill.
pub async fn collect_garbage(
    stores: &Stores,
    output_uri: &str,
    job_uid: &str,
) -> Result<Garbage, StorageError> {
    let prefix = stores.locate(output_uri)?.join(&parts_dir(job_uid));
    let uri = prefix.uri();
    let store = prefix.store().clone();
    let paths = store
        .list(Some(prefix.path()))
        .map_ok(|m| m.location)
        .boxed();
    let deleted: Vec<_> = store
        .delete_stream(paths)
        .try_collect()
        .await
        .map_err(|e| StorageError::from_store(&uri, e))?;
    if prefix.is_local() {
        let dir = std::path::PathBuf::from(prefix.uri());
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    let uploads = stores.abort_open_uploads(&prefix).await?;
    Ok(Garbage {
        objects: deleted.len(),
        uploads,
    })
}

async fn put(loc: &Location, body: Vec<u8>) -> Result<(), FinalizeError> {
    loc.store()
        .put(loc.path(), PutPayload::from(body))
        .await
        .map_err(|e| StorageError::from_store(&loc.uri(), e))?;
    sync_local(loc).await?;
    Ok(())
}

/// The planned files already at their output names (path -> size): published by an earlier
/// attempt of this commit. A file there that is not provably this job's is `Foreign`.
async fn published_files(
    out: &Location,
    job_uid: &str,
    files: &[FilePlan],
) -> Result<HashMap<String, u64>, FinalizeError> {
    let found: Vec<Option<(String, u64)>> = futures::stream::iter(files.iter().cloned())
        .map(|f| async move {
            let bytes = owned_file(&out.join(&f.path), job_uid, f.rows).await?;
            Ok::<_, FinalizeError>(bytes.map(|b| (f.path, b)))
        })
        .buffered(FILE_CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

/// Publishes each file not yet at its output name; answers the manifest's entries.
async fn write_files(
    stores: &Stores,
    out: &Location,
    files: &[FilePlan],
    published: &HashMap<String, u64>,
) -> Result<Vec<ManifestFile>, FinalizeError> {
    futures::stream::iter(files.iter().cloned())
        .map(|f| async move {
            let bytes = match published.get(&f.path) {
                Some(&bytes) => bytes,
                None => publish_object(&stores.locate(&f.source)?, &out.join(&f.path)).await?,
            };
            Ok::<_, FinalizeError>(ManifestFile {
                path: f.path.clone(),
                rows: f.rows,
                bytes,
            })
        })
        .buffered(FILE_CONCURRENCY)
        .try_collect()
        .await
}

/// The Arrow schema a Parquet file's footer holds (no row data is read).
async fn schema_of(stores: &Stores, uri: &str) -> Result<SchemaRef, FinalizeError> {
    let part_err = |m: String| FinalizeError::Part {
        uri: uri.to_string(),
        message: m,
    };
    let loc = stores.locate(uri)?;
    let meta = loc
        .store()
        .head(loc.path())
        .await
        .map_err(|e| StorageError::from_store(uri, e))?;
    let footer = ObjectReader::new(loc, meta.size, None)
        .footer()
        .await
        .map_err(|e| part_err(e.to_string()))?;
    let arrow_meta = ArrowReaderMetadata::try_new(footer, ArrowReaderOptions::new())
        .map_err(|e| part_err(e.to_string()))?;
    Ok(arrow_meta.schema().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_merged_file_with_rows_in_order() {
        let parts = [
            ("a".to_string(), 5),
            ("b".to_string(), 0),
            ("c".to_string(), 7),
        ];
        let files = plan_files(&parts, OUTPUT_FILE_STEM);
        assert_eq!(files.len(), 2);
        assert_eq!(
            (files[0].path.as_str(), files[0].source.as_str()),
            ("part-00000.parquet", "a")
        );
        assert_eq!(
            (files[1].path.as_str(), files[1].rows),
            ("part-00001.parquet", 7)
        );
        let errors = plan_files(&[("e".to_string(), 1)], ERROR_FILE_STEM);
        assert_eq!(errors[0].path, "_errors/errors-00000.parquet");
    }
}
