//! Merge work: a lease on a shard of kind `merge` rewrites the committed parts of a run of row
//! shards (given in the lease, in row order) into one output file and one error file, writes
//! them in place under the output names the lease gives (`MergeFiles`; a file without rows, or
//! merge work planned before files were numbered, goes under the lease's part name), and
//! checkpoints them as its one part. The commit then only checks them. A worker that dies
//! mid-merge leaves an upload that is never completed; the lease expires and the next worker
//! merges again, or takes the file as it is if the first one finished it.

use std::sync::atomic::Ordering;

use futures::StreamExt;
use nightshift_proto::wire::{PartRecord, ShardLease, part_object};
use nightshift_storage::location::plain_file_inside;
use nightshift_storage::{
    Location, Occupant, PartUpload, StorageError, Stores, occupant, read_all, storage_cause,
};
use parquet::arrow::AsyncArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use tokio_util::sync::CancellationToken;

use crate::context::WorkerContext;
use crate::pipeline::parts::writer_properties;
use crate::pipeline::{ShardOutcome, ShardSignals};
use crate::shard_error::ShardError;

/// Rows per batch while copying parts into the merged file.
const MERGE_BATCH_ROWS: usize = 64 * 1024;
/// Bytes of parts held in memory at once while merging, and the most parts fetched at once.
const MERGE_PREFETCH_BYTES: u64 = 64 * 1024 * 1024;
const MERGE_PREFETCH_PARTS: usize = 16;

/// Runs merge work to its checkpoint and completion.
pub async fn run_merge(
    ctx: &WorkerContext,
    lease: &ShardLease,
    sources: &[PartRecord],
    signals: &ShardSignals,
) -> Result<ShardOutcome, ShardError> {
    let lease_ref = lease.lease_ref();
    if lease.checkpoint_rows >= lease.plan.rows {
        ctx.client.complete(lease_ref).await?;
        return Ok(ShardOutcome::Completed { rows: 0 });
    }
    let out = ctx.stores.locate(&lease.spec.output.uri)?;
    let props = writer_properties(&lease.job_uid);
    let rows: u64 = sources.iter().map(|p| p.rows).sum();
    let error_rows: u64 = sources.iter().map(|p| p.error_rows).sum();
    let target = |errors| MergeTarget {
        dest: out.join(&part_object(
            &lease.job_uid,
            &lease_ref,
            0,
            errors,
            lease.merge_files.as_ref(),
        )),
        in_place: lease.merge_files.and_then(|m| m.name(errors)).is_some(),
        rows: if errors {
            error_rows
        } else {
            rows.saturating_sub(error_rows)
        },
    };
    let outputs: Vec<(String, u64)> = sources.iter().map(|p| (p.uri.clone(), p.bytes)).collect();
    let m = Merger {
        stores: &ctx.stores,
        output: &out,
        job_uid: &lease.job_uid,
        props: &props,
        abort: &signals.abort,
    };
    let Some((merged, bytes)) = m.merge(target(false), &outputs).await? else {
        return Ok(ShardOutcome::Lost);
    };
    let errors: Vec<(String, u64)> = sources
        .iter()
        .filter_map(|p| p.error_uri.clone().map(|u| (u, p.error_bytes)))
        .collect();
    let (error_uri, error_bytes) = if errors.is_empty() {
        (None, 0)
    } else {
        match m.merge(target(true), &errors).await? {
            Some((loc, bytes)) => (Some(loc.uri()), bytes),
            None => return Ok(ShardOutcome::Lost),
        }
    };
    let part = PartRecord {
        uri: merged.uri(),
        row_start: 0,
        rows,
        bytes,
        error_rows,
        error_uri,
        error_bytes,
        tokens: None,
    };
    ctx.client.checkpoint(lease_ref, part, None).await?;
    ctx.client.complete(lease_ref).await?;
    tracing::info!(
        shard = lease.shard_id,
        parts = sources.len(),
        rows,
        bytes,
        "merged"
    );
    Ok(ShardOutcome::Completed { rows })
}

/// Where one merged file goes: at an output name (`in_place`), or at the lease's part name.
struct MergeTarget {
    dest: Location,
    in_place: bool,
    /// Rows it holds.
    rows: u64,
}

/// What every file of one merge lease is written with.
struct Merger<'a> {
    stores: &'a Stores,
    output: &'a Location,
    job_uid: &'a str,
    props: &'a WriterProperties,
    abort: &'a CancellationToken,
}

impl Merger<'_> {
    /// Writes `sources` into `target`; `None` when aborted. At an output name, a file an
    /// earlier lease of this merge wrote is taken as it is (the same rows, from the same
    /// parts), and anything else there is refused, never overwritten.
    async fn merge(
        &self,
        target: MergeTarget,
        sources: &[(String, u64)],
    ) -> Result<Option<(Location, u64)>, ShardError> {
        if target.in_place
            && let Some(found) = self.claimed(&target).await?
        {
            return Ok(Some(found));
        }
        self.write(target, sources).await
    }

    /// What lies at an output name, for this merge: nothing (`None`), a file of this job and
    /// these rows to take as it is, or anything else, refused as `Taken` with the job that
    /// wrote it.
    async fn claimed(&self, target: &MergeTarget) -> Result<Option<(Location, u64)>, ShardError> {
        match occupant(&target.dest, self.job_uid, target.rows).await? {
            Occupant::Free => Ok(None),
            Occupant::Ours { bytes } => Ok(Some((target.dest.clone(), bytes))),
            Occupant::Foreign { found, owner } => Err(ShardError::Taken {
                uri: target.dest.uri(),
                found,
                owner,
            }),
        }
    }

    /// Writes the file. A file may come to an output name after `claimed` found it free (a
    /// cancelled job's late worker, or an earlier lease of this merge): the create-only write
    /// is then refused, and whose that file is decides as before the write. Where the name is
    /// free again, the refusal is retried.
    async fn write(
        &self,
        target: MergeTarget,
        sources: &[(String, u64)],
    ) -> Result<Option<(Location, u64)>, ShardError> {
        let written = merge_files(
            self.stores,
            self.output,
            target.dest.clone(),
            sources,
            self.props,
            self.abort,
        )
        .await;
        match written {
            Err(ShardError::Storage(StorageError::AlreadyExists { uri })) if target.in_place => {
                match self.claimed(&target).await? {
                    Some(found) => Ok(Some(found)),
                    None => Err(ShardError::Write {
                        uri,
                        message: "a file was at this name when it was written, and is gone".into(),
                    }),
                }
            }
            other => other,
        }
    }
}

/// A local part must be a plain file under the job's output, reached through no link from it
/// (`root`): a link planted after its checkpoint would merge a file from elsewhere.
async fn check_local_part(loc: &Location, root: String) -> Result<(), ShardError> {
    if !loc.is_local() {
        return Ok(());
    }
    let path = loc.uri();
    let inside = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || plain_file_inside(&root, &path))
            .await
            .unwrap_or(false)
    };
    if inside {
        return Ok(());
    }
    Err(ShardError::Read {
        uri: path,
        message: "not a plain file inside the job's parts directory".into(),
        class: nightshift_proto::FailureClass::Permanent,
    })
}

/// Copies the rows of `sources` (URI and size), in order, into a new file at `dest`; `None`
/// when `abort` fired first (the upload is abandoned). Parts are small and many (one per
/// checkpoint), so they are fetched whole, several at once within `MERGE_PREFETCH_BYTES`.
async fn merge_files(
    stores: &Stores,
    output: &Location,
    dest: Location,
    sources: &[(String, u64)],
    props: &WriterProperties,
    abort: &CancellationToken,
) -> Result<Option<(Location, u64)>, ShardError> {
    let write_err = |e: parquet::errors::ParquetError| match storage_cause(&e) {
        Some(StorageError::AlreadyExists { uri }) => {
            ShardError::Storage(StorageError::AlreadyExists { uri: uri.clone() })
        }
        _ => ShardError::Write {
            uri: dest.uri(),
            message: e.to_string(),
        },
    };
    let upload = PartUpload::new(dest.clone());
    let counter = upload.bytes_counter();
    let mut upload = Some(upload);
    let mut writer: Option<AsyncArrowWriter<PartUpload>> = None;
    let largest = sources
        .iter()
        .map(|(_, size)| *size)
        .max()
        .unwrap_or(1)
        .max(1);
    let in_flight = (MERGE_PREFETCH_BYTES / largest).clamp(1, MERGE_PREFETCH_PARTS as u64) as usize;
    let root = output.uri();
    let mut fetched = futures::stream::iter(sources.iter().cloned())
        .map(|(uri, _)| {
            let root = root.clone();
            async move {
                let loc = stores.locate(&uri)?;
                check_local_part(&loc, root).await?;
                Ok::<_, ShardError>((uri, read_all(&loc).await?))
            }
        })
        .buffered(in_flight);
    while let Some(next) = fetched.next().await {
        let (uri, bytes) = next?;
        if abort.is_cancelled() {
            if let Some(w) = writer.take() {
                w.into_inner().abort().await;
            }
            return Ok(None);
        }
        let parquet_err = |e| ShardError::from_parquet(&uri, e);
        let rows = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(parquet_err)?
            .with_batch_size(MERGE_BATCH_ROWS);
        let schema = rows.schema().clone();
        let w = match (writer.as_mut(), upload.take()) {
            (Some(w), _) => w,
            (None, Some(upload)) => writer.insert(
                AsyncArrowWriter::try_new(upload, schema, Some(props.clone()))
                    .map_err(write_err)?,
            ),
            (None, None) => return Err(ShardError::Internal("merge writer lost".into())),
        };
        for batch in rows.build().map_err(parquet_err)? {
            let batch = batch.map_err(|e| parquet_err(e.into()))?;
            w.write(&batch).await.map_err(write_err)?;
        }
    }
    match writer {
        Some(w) => {
            w.close().await.map_err(write_err)?;
            Ok(Some((dest, counter.load(Ordering::Relaxed))))
        }
        None => Err(ShardError::Internal("merge work without parts".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use nightshift_storage::s3::S3Settings;
    use parquet::arrow::ArrowWriter;

    use super::*;

    /// A Parquet file of `rows` rows at `path`, its footer naming `job_uid`; its size.
    fn parquet_file(path: &std::path::Path, job_uid: &str, rows: i64) -> u64 {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let column = Arc::new(Int64Array::from_iter_values(0..rows));
        let batch = RecordBatch::try_new(schema.clone(), vec![column]).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut w = ArrowWriter::try_new(file, schema, Some(writer_properties(job_uid))).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        std::fs::metadata(path).unwrap().len()
    }

    /// Merges this job's one part of 5 rows into `part-00000.parquet` of its output, as merge
    /// work that found the name free does once that check is behind it, with `at_name` put
    /// there first (as if it came after the check); what the write answers.
    async fn write_after_the_check(at_name: Option<&str>) -> Result<u64, ShardError> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        std::fs::create_dir_all(root.join("_parts")).unwrap();
        let part = root.join("_parts/p.parquet");
        let part_bytes = parquet_file(&part, "job-a", 5);
        if let Some(owner) = at_name {
            parquet_file(&root.join("part-00000.parquet"), owner, 5);
        }
        let stores = Stores::new(S3Settings::default());
        let output = stores.locate(&root.display().to_string()).unwrap();
        let props = writer_properties("job-a");
        let abort = CancellationToken::new();
        let m = Merger {
            stores: &stores,
            output: &output,
            job_uid: "job-a",
            props: &props,
            abort: &abort,
        };
        let target = MergeTarget {
            dest: output.join("part-00000.parquet"),
            in_place: true,
            rows: 5,
        };
        let sources = [(part.display().to_string(), part_bytes)];
        let (loc, bytes) = m.write(target, &sources).await?.expect("not aborted");
        assert_eq!(
            loc.uri(),
            root.join("part-00000.parquet").display().to_string()
        );
        Ok(bytes)
    }

    #[tokio::test]
    async fn a_free_name_gets_the_merged_file() {
        assert!(write_after_the_check(None).await.unwrap() > 0);
    }

    #[tokio::test]
    async fn another_jobs_file_that_came_after_the_check_is_refused_naming_its_job() {
        let e = write_after_the_check(Some("job-b")).await.unwrap_err();
        assert_eq!(e.taken_by(), Some("job-b"), "{e}");
        assert!(matches!(e, ShardError::Taken { .. }), "{e}");
    }

    #[tokio::test]
    async fn this_merges_file_that_came_after_the_check_is_taken_as_it_is() {
        assert!(write_after_the_check(Some("job-a")).await.unwrap() > 0);
    }
}
