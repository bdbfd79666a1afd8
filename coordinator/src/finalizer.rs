//! Commit: when every shard is done, workers have already made the output files (merge work,
//! `merges.rs`: each about `output.target_file_mb`), in place under their output names; the
//! commit reads no row data and moves none. Each file's footer was checked at its merge's
//! checkpoint (`part_check.rs`); the commit finds each unchanged, writes `_manifest.json` and
//! then `_SUCCESS`, and the parts are deleted. (A merged file made under
//! a part name, by merge work planned before files were numbered, is put whole under its
//! output name: a server-side copy on S3, a rename locally, `publish_object`.)
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
use nightshift_storage::location::plain_file_inside;
use nightshift_storage::{
    Location, ObjectReader, StorageError, Stores, publish_object, sync_local,
};
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};

use crate::ownership::{check_manifest_owner, owned_file, verify_parts};
use crate::part_check::PartError;
use nightshift_metastore::{DynMetastore, JobRecord, PartRow};

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

/// One output file: a whole merged file, at its output name already or put there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    pub path: String,
    /// URI of the merged file.
    pub source: String,
    pub rows: u64,
    /// Its size as recorded.
    pub bytes: u64,
}

/// One output file per merged file (URI, rows, bytes) that has rows, named in order.
pub fn plan_files(parts: &[(String, u64, u64)], stem: &str) -> Vec<FilePlan> {
    parts
        .iter()
        .filter(|(_, rows, _)| *rows > 0)
        .enumerate()
        .map(|(i, (uri, rows, bytes))| FilePlan {
            path: data_file(stem, i),
            source: uri.clone(),
            rows: *rows,
            bytes: *bytes,
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
    let files = plan_files(&output_parts, OUTPUT_FILE_STEM);
    let error_files = plan_files(&error_parts, ERROR_FILE_STEM);
    let all: Vec<FilePlan> = files.iter().chain(&error_files).cloned().collect();
    // Merge work wrote these in place, and their footers were checked at its checkpoint: they
    // are kept as found, unchanged. Of the rest (merge work planned before files were
    // numbered), files an earlier attempt published are kept, and every other source is
    // checked before anything is written.
    let (in_place, moved): (Vec<FilePlan>, Vec<FilePlan>) = all
        .into_iter()
        .partition(|f| f.source == out.join(&f.path).uri());
    let mut published = unchanged_files(&out, &in_place).await?;
    published.extend(published_files(&out, &job.uid, &moved).await?);
    let sources_left: HashSet<String> = moved
        .iter()
        .filter(|f| !published.contains_key(&f.path))
        .map(|f| f.source.clone())
        .collect();
    let in_place: HashSet<String> = in_place.into_iter().map(|f| f.source).collect();
    verify_parts(&out, job, parts, &sources_left, &in_place).await?;
    let written = write_files(stores, &out, &files, &published).await?;
    let errors_written = write_files(stores, &out, &error_files, &published).await?;
    let schema = match &job.output_schema {
        Some(json) => serde_json::from_str(json).map_err(|e| FinalizeError::Incomplete {
            job: job.id,
            message: format!("its recorded output schema does not parse: {e}"),
        })?,
        None => manifest_fields(&*first_schema(stores, &out, &files, parts).await?),
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
        schema,
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

/// A schema as the manifest lists it.
pub(crate) fn manifest_fields(schema: &arrow_schema::Schema) -> Vec<ManifestField> {
    schema
        .fields()
        .iter()
        .map(|f| ManifestField {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
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

/// The files merge work wrote in place, found as their checkpoint left them (the size
/// recorded; their footers were checked then): path -> size. One that is gone or changed fails
/// the commit, naming it. Locally each is looked at (a plain file reached through no link, all
/// in one blocking task); on an object store the output is listed, a page per thousand
/// files, not asked file by file.
async fn unchanged_files(
    out: &Location,
    files: &[FilePlan],
) -> Result<HashMap<String, u64>, FinalizeError> {
    if files.is_empty() {
        return Ok(HashMap::new());
    }
    let mut found: HashMap<String, Result<u64, PartError>> = if out.is_local() {
        local_sizes(out, files).await?
    } else {
        let listed = listed_sizes(out, files).await?;
        listed
            .into_iter()
            .map(|(path, size)| (path, Ok(size)))
            .collect()
    };
    let mut unchanged = HashMap::with_capacity(files.len());
    for f in files {
        let uri = out.join(&f.path).uri();
        let checked = match found.remove(&f.path) {
            Some(Ok(actual)) if actual == f.bytes => Ok(()),
            Some(Ok(actual)) => Err(PartError::WrongSize {
                uri: uri.clone(),
                actual,
                reported: f.bytes,
            }),
            Some(Err(e)) => Err(e),
            None => Err(PartError::Missing { uri: uri.clone() }),
        };
        checked.map_err(|e| FinalizeError::part(&uri, e))?;
        unchanged.insert(f.path.clone(), f.bytes);
    }
    Ok(unchanged)
}

/// The size of each local file, or why it cannot be taken: missing, or not a plain file reached
/// through no link from the output.
async fn local_sizes(
    out: &Location,
    files: &[FilePlan],
) -> Result<HashMap<String, Result<u64, PartError>>, FinalizeError> {
    let root = out.uri();
    let paths: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.path.clone(), out.join(&f.path).uri()))
        .collect();
    let look = move || {
        paths
            .into_iter()
            .map(|(path, uri)| {
                let size = match std::fs::symlink_metadata(&uri) {
                    Err(_) => Err(PartError::Missing { uri }),
                    Ok(_) if !plain_file_inside(&root, &uri) => Err(PartError::Escapes { uri }),
                    Ok(meta) => Ok(meta.len()),
                };
                (path, size)
            })
            .collect()
    };
    tokio::task::spawn_blocking(look)
        .await
        .map_err(|e| FinalizeError::Write {
            uri: out.uri(),
            message: e.to_string(),
        })
}

/// The sizes of the objects in the directories (relative to `out`) that hold `files`, by path
/// relative to `out`.
async fn listed_sizes(
    out: &Location,
    files: &[FilePlan],
) -> Result<HashMap<String, u64>, FinalizeError> {
    let dirs: HashSet<&str> = files
        .iter()
        .map(|f| f.path.rsplit_once('/').map_or("", |(dir, _)| dir))
        .collect();
    let mut sizes = HashMap::new();
    for dir in dirs {
        for (name, size) in Stores::list_dir(&out.join(dir)).await? {
            let path = match dir {
                "" => name,
                dir => format!("{dir}/{name}"),
            };
            sizes.insert(path, size);
        }
    }
    Ok(sizes)
}

/// The schema of the first output file, or else of the first part (read from a footer): for
/// a job whose files were not checked in place (`JobRecord::output_schema` unset).
async fn first_schema(
    stores: &Stores,
    out: &Location,
    files: &[FilePlan],
    parts: &[PartRow],
) -> Result<SchemaRef, FinalizeError> {
    match (files.first(), parts.first()) {
        (Some(f), _) => schema_of(stores, &out.join(&f.path).uri()).await,
        (None, Some(p)) => schema_of(stores, &p.uri).await,
        (None, None) => Ok(Arc::new(arrow_schema::Schema::empty())),
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
/// mid-part, which S3 would otherwise keep and bill; and clears what such workers left at the
/// output names merge work writes in place (`names`, the manifest's files): open uploads on
/// S3, staging files locally.
pub async fn collect_garbage(
    stores: &Stores,
    output_uri: &str,
    job_uid: &str,
    names: &[String],
) -> Result<Garbage, StorageError> {
    let out = stores.locate(output_uri)?;
    let prefix = out.join(&parts_dir(job_uid));
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
    let unfinished = stores.clear_unfinished(&out, names).await?;
    Ok(Garbage {
        objects: deleted.len(),
        uploads: uploads + unfinished,
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

    #[tokio::test]
    async fn files_written_in_place_must_be_found_as_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::default();
        let out = stores.locate(dir.path().to_str().unwrap()).unwrap();
        std::fs::write(dir.path().join("part-00000.parquet"), b"12345").unwrap();
        let plan = |i: usize, bytes| {
            let path = data_file(OUTPUT_FILE_STEM, i);
            FilePlan {
                source: out.join(&path).uri(),
                path,
                rows: 1,
                bytes,
            }
        };
        let found = unchanged_files(&out, &[plan(0, 5)]).await.unwrap();
        assert_eq!(found.get("part-00000.parquet"), Some(&5));
        let refused = |r: Result<HashMap<String, u64>, FinalizeError>, what: &str| match r {
            Err(FinalizeError::Part { message, .. }) => {
                assert!(message.contains(what), "{message}")
            }
            other => panic!("expected a refusal naming {what}: {other:?}"),
        };
        refused(unchanged_files(&out, &[plan(0, 6)]).await, "holds 5 bytes");
        refused(unchanged_files(&out, &[plan(1, 5)]).await, "does not exist");
        let link = dir.path().join("part-00002.parquet");
        std::os::unix::fs::symlink(dir.path().join("part-00000.parquet"), link).unwrap();
        refused(
            unchanged_files(&out, &[plan(2, 5)]).await,
            "not a plain file",
        );
    }

    #[test]
    fn one_file_per_merged_file_with_rows_in_order() {
        let parts = [
            ("a".to_string(), 5, 50),
            ("b".to_string(), 0, 10),
            ("c".to_string(), 7, 70),
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
        let errors = plan_files(&[("e".to_string(), 1, 10)], ERROR_FILE_STEM);
        assert_eq!(errors[0].path, "_errors/errors-00000.parquet");
    }
}
