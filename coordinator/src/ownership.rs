//! Which files a commit may take as its own. Parts come from workers, which the coordinator
//! does not trust, and an output location may hold files no job of this coordinator wrote: so
//! a part is used only when it lies in the job's parts directory with the size recorded and a
//! footer that names the job and holds the rows recorded, a file already at an output name is
//! kept only when its footer names this job, and a manifest is replaced only when it is this
//! job's. Footers only: no row data is read here.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use nightshift_proto::layout::{JOB_UID_KEY, parts_dir};
use nightshift_proto::wire::Manifest;
use nightshift_storage::{Location, ObjectReader, StorageError, read_all};
use object_store::ObjectStoreExt;

use crate::finalizer::FinalizeError;
use crate::part_check::verify_object;
use nightshift_metastore::{JobRecord, PartRow};

/// Parts checked at once.
const VERIFY_CONCURRENCY: usize = 16;

/// The job a Parquet file's footer names (if any) and the rows it holds.
async fn stamp(loc: &Location, size: u64) -> Result<(Option<String>, u64), String> {
    let mut reader = ObjectReader::new(loc.clone(), size, None);
    let footer = reader.footer().await.map_err(|e| e.to_string())?;
    let file = footer.file_metadata();
    let owner = file
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == JOB_UID_KEY))
        .and_then(|kv| kv.value.clone());
    Ok((owner, file.num_rows().max(0) as u64))
}

/// Every part (and error part) lies in the job's parts directory, and those in `present`
/// (the ones the commit still reads) are there as recorded.
pub async fn verify_parts(
    out: &Location,
    job: &JobRecord,
    parts: &[PartRow],
    present: &HashSet<String>,
) -> Result<(), FinalizeError> {
    let dir = parts_dir(&job.uid);
    // (uri, bytes, rows) of every part and error part.
    let mut objects: Vec<(String, u64, u64)> = Vec::with_capacity(parts.len());
    for p in parts {
        objects.push((p.uri.clone(), p.bytes, p.rows - p.error_rows));
        if let Some(u) = &p.error_uri {
            objects.push((u.clone(), p.error_bytes, p.error_rows));
        }
    }
    let dir = &dir;
    futures::stream::iter(objects)
        .map(|(uri, bytes, rows)| async move {
            let rel = uri
                .strip_prefix(&format!("{}/", out.uri()))
                .filter(|rel| rel.starts_with(&format!("{dir}/")) && out.join(rel).uri() == uri)
                .ok_or_else(|| FinalizeError::Part {
                    uri: uri.clone(),
                    message: format!("not inside `{}`", out.join(dir).uri()),
                })?;
            if !present.contains(&uri) {
                return Ok(());
            }
            verify_object(out, rel, bytes)
                .await
                .map_err(|e| FinalizeError::part(&uri, e))?;
            let bad = |message: String| FinalizeError::Part {
                uri: uri.clone(),
                message,
            };
            match stamp(&out.join(rel), bytes).await {
                Ok((Some(owner), n)) if owner == job.uid && n == rows => Ok(()),
                Ok((Some(owner), n)) if owner == job.uid => {
                    Err(bad(format!("it holds {n} rows, not the {rows} recorded")))
                }
                Ok(_) => Err(bad("it is not a part this job's workers wrote".into())),
                Err(e) => Err(bad(format!("not a Parquet part: {e}"))),
            }
        })
        .buffer_unordered(VERIFY_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A manifest already at `loc` must be this job's.
pub async fn check_manifest_owner(loc: &Location, job_uid: &str) -> Result<(), FinalizeError> {
    match read_all(loc).await {
        Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) if m.job_uid == job_uid => Ok(()),
            Ok(m) => Err(FinalizeError::Foreign {
                uri: loc.uri(),
                found: format!("the manifest of job `{}` ({})", m.job, m.job_uid),
            }),
            Err(_) => Err(FinalizeError::Foreign {
                uri: loc.uri(),
                found: "not a nightshift manifest".into(),
            }),
        },
        Err(StorageError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The size of the file at `dest` when an earlier attempt of this commit wrote it: its footer
/// names this job and holds `rows` rows. `None` when there is no file; `Foreign` when there is
/// one that is not provably this job's.
pub async fn owned_file(
    dest: &Location,
    job_uid: &str,
    rows: u64,
) -> Result<Option<u64>, FinalizeError> {
    let meta = match dest.store().head(dest.path()).await {
        Ok(meta) => meta,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(StorageError::from_store(&dest.uri(), e).into()),
    };
    let foreign = |found: String| FinalizeError::Foreign {
        uri: dest.uri(),
        found,
    };
    let (owner, n) = stamp(dest, meta.size)
        .await
        .map_err(|e| foreign(format!("not a Parquet file this job wrote: {e}")))?;
    match owner {
        Some(uid) if uid == job_uid && n == rows => Ok(Some(meta.size)),
        Some(uid) if uid == job_uid => Err(foreign(format!(
            "this job's file of {n} rows where {rows} are planned"
        ))),
        Some(uid) => Err(foreign(format!("written for job {uid}"))),
        None => Err(foreign("a file no nightshift job wrote".into())),
    }
}
