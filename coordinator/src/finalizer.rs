//! Commit: when every shard is done, the committed parts are gathered into output files sized
//! toward `output.target_file_mb` (a part big enough is copied as is; runs of small parts are
//! rewritten into one file), then `_manifest.json` and then `_SUCCESS` are written, and the
//! parts are deleted. Every step is idempotent, so a crash mid-commit and a second run produce
//! the same manifest.
//!
//! The commit adopts nothing it cannot prove its own (`ownership.rs`): a file already at an
//! output name is kept only when its footer names this job (`layout::JOB_UID_KEY`) and holds
//! the planned rows, and a manifest is overwritten only when it is this job's. Every part is
//! checked before anything is written: one that is missing, of another size, not a plain file
//! in the job's parts directory, or whose footer does not name the job and its rows, fails the
//! commit for good, naming it. Before `_manifest.json` and `_SUCCESS` the finalizer renews its
//! claim, so a job cancelled mid-commit is not published.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use futures::{StreamExt, TryStreamExt};
use nightshift_proto::layout::{
    ERROR_FILE_STEM, JOB_UID_KEY, MANIFEST, OUTPUT_FILE_STEM, SUCCESS, data_file, parts_dir,
};
use nightshift_proto::wire::{InputFile, Manifest, ManifestField, ManifestFile};
use nightshift_storage::{
    Location, ObjectReader, PartUpload, StorageError, Stores, copy_object, sync_local,
};
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::ownership::{check_manifest_owner, owned_file, verify_parts};
use crate::part_check::PartError;
use crate::store::{DynStore, JobRecord, PartRow};

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
    pub store: &'a DynStore,
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

/// One output file to produce from consecutive parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    pub path: String,
    /// URIs of the parts, in order.
    pub sources: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
}

/// Groups consecutive parts into files of at least `target` bytes; only the last file may be
/// smaller. Parts with no rows are left out.
pub fn plan_files(parts: &[(String, u64, u64)], target: u64, stem: &str) -> Vec<FilePlan> {
    let mut files = Vec::new();
    let mut current: Option<FilePlan> = None;
    for (uri, rows, bytes) in parts {
        if *rows == 0 {
            continue;
        }
        let f = current.get_or_insert_with(|| FilePlan {
            path: String::new(),
            sources: Vec::new(),
            rows: 0,
            bytes: 0,
        });
        f.sources.push(uri.clone());
        f.rows += rows;
        f.bytes += bytes;
        if f.bytes >= target {
            files.extend(current.take());
        }
    }
    files.extend(current.take());
    for (i, f) in files.iter_mut().enumerate() {
        f.path = data_file(stem, i);
    }
    files
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
    claim: &Claim<'_>,
) -> Result<Committed, FinalizeError> {
    let out = stores.locate(&job.output_uri)?;
    check_coverage(job, parts)?;
    verify_parts(&out, job, parts).await?;
    let target = job.spec.output.target_file_mb * 1024 * 1024;
    let output_parts: Vec<(String, u64, u64)> = parts
        .iter()
        .map(|p| (p.uri.clone(), p.rows - p.error_rows, p.bytes))
        .collect();
    let error_parts: Vec<(String, u64, u64)> = parts
        .iter()
        .filter_map(|p| {
            p.error_uri
                .clone()
                .map(|u| (u, p.error_rows, p.error_bytes))
        })
        .collect();
    let files = plan_files(&output_parts, target, OUTPUT_FILE_STEM);
    let error_files = plan_files(&error_parts, target, ERROR_FILE_STEM);

    let written = write_files(stores, &out, &job.uid, &files).await?;
    let errors_written = write_files(stores, &out, &job.uid, &error_files).await?;
    let schema = match files.first() {
        Some(f) => schema_of(stores, &f.sources[0]).await?,
        None => match parts.first() {
            Some(p) => schema_of(stores, &p.uri).await?,
            None => Arc::new(arrow_schema::Schema::empty()),
        },
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
    };
    let body = serde_json::to_vec_pretty(&manifest).map_err(|e| FinalizeError::Write {
        uri: out.join(MANIFEST).uri(),
        message: e.to_string(),
    })?;
    crash_point("finalize:before-manifest");
    check_manifest_owner(&out.join(MANIFEST), &job.uid).await?;
    claim.renew().await?;
    put(&out.join(MANIFEST), body).await?;
    crash_point("finalize:before-success");
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

/// Crash tests stop the process here, for real, when `NIGHTSHIFT_CRASH_AT` names this point:
/// the only way to land a crash exactly between two commit steps.
fn crash_point(name: &str) {
    if std::env::var("NIGHTSHIFT_CRASH_AT").is_ok_and(|v| v == name) {
        eprintln!("crash point {name}: aborting");
        std::process::abort();
    }
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

async fn write_files(
    stores: &Stores,
    out: &Location,
    job_uid: &str,
    files: &[FilePlan],
) -> Result<Vec<ManifestFile>, FinalizeError> {
    futures::stream::iter(files.iter().cloned())
        .map(|f| async move {
            let dest = out.join(&f.path);
            let bytes = match owned_file(&dest, job_uid, f.rows).await? {
                Some(bytes) => bytes,
                None => write_file(stores, &dest, job_uid, &f).await?,
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

/// Produces one output file; returns its size.
async fn write_file(
    stores: &Stores,
    dest: &Location,
    job_uid: &str,
    f: &FilePlan,
) -> Result<u64, FinalizeError> {
    if let [single] = f.sources.as_slice() {
        let src = stores.locate(single)?;
        if src.uri().starts_with(&root_of(dest)) {
            return Ok(copy_object(&src, dest).await?);
        }
    }
    let mut writer: Option<AsyncArrowWriter<PartUpload>> = None;
    let mut bytes = None;
    for uri in &f.sources {
        let (mut stream, schema) = open_part(stores, uri).await?;
        let w = match writer.as_mut() {
            Some(w) => w,
            None => {
                let upload = PartUpload::new(dest.clone());
                bytes = Some(upload.bytes_counter());
                writer.insert(
                    AsyncArrowWriter::try_new(upload, schema, Some(file_properties(job_uid)))
                        .map_err(|e| FinalizeError::Write {
                            uri: dest.uri(),
                            message: e.to_string(),
                        })?,
                )
            }
        };
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| FinalizeError::Part {
                uri: uri.clone(),
                message: e.to_string(),
            })?;
            w.write(&batch).await.map_err(|e| FinalizeError::Write {
                uri: dest.uri(),
                message: e.to_string(),
            })?;
        }
    }
    if let Some(w) = writer {
        w.close().await.map_err(|e| FinalizeError::Write {
            uri: dest.uri(),
            message: e.to_string(),
        })?;
    }
    Ok(bytes
        .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
        .unwrap_or(0))
}

/// Output files the commit writes: Snappy, and a footer that names the job.
fn file_properties(job_uid: &str) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            JOB_UID_KEY.to_string(),
            job_uid.to_string(),
        )]))
        .build()
}

/// `s3://bucket` or empty for local paths: copies stay within one store.
fn root_of(loc: &Location) -> String {
    let uri = loc.uri();
    match uri.strip_prefix("s3://") {
        Some(rest) => format!("s3://{}", rest.split('/').next().unwrap_or("")),
        None => String::new(),
    }
}

type BatchStream = parquet::arrow::async_reader::ParquetRecordBatchStream<ObjectReader>;

async fn open_part(stores: &Stores, uri: &str) -> Result<(BatchStream, SchemaRef), FinalizeError> {
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
    let mut reader = ObjectReader::new(loc, meta.size, None);
    let footer = reader.footer().await.map_err(|e| part_err(e.to_string()))?;
    let arrow_meta = ArrowReaderMetadata::try_new(footer, ArrowReaderOptions::new())
        .map_err(|e| part_err(e.to_string()))?;
    let schema = arrow_meta.schema().clone();
    let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, arrow_meta)
        .with_batch_size(64 * 1024)
        .build()
        .map_err(|e| part_err(e.to_string()))?;
    Ok((stream, schema))
}

async fn schema_of(stores: &Stores, uri: &str) -> Result<SchemaRef, FinalizeError> {
    Ok(open_part(stores, uri).await?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_reach_the_target_and_only_the_last_is_small() {
        let mb = 1024 * 1024;
        let parts: Vec<(String, u64, u64)> =
            (0..25).map(|i| (format!("p{i}"), 10, 30 * mb)).collect();
        let files = plan_files(&parts, 100 * mb, OUTPUT_FILE_STEM);
        assert_eq!(files.len(), 7);
        assert!(files[..6].iter().all(|f| f.bytes >= 100 * mb));
        assert_eq!(files[6].sources, ["p24"]);
        assert_eq!(files[0].path, "part-00000.parquet");
        let rows: u64 = files.iter().map(|f| f.rows).sum();
        assert_eq!(rows, 250);
        let big = vec![
            ("a".to_string(), 5, 500 * mb),
            ("b".to_string(), 0, 0),
            ("c".to_string(), 5, 1),
        ];
        let files = plan_files(&big, 100 * mb, OUTPUT_FILE_STEM);
        assert_eq!(
            files.iter().map(|f| f.sources.clone()).collect::<Vec<_>>(),
            [vec!["a".to_string()], vec!["c".to_string()]]
        );
    }
}
