//! Which files a commit may take as its own. Parts come from workers, which the coordinator
//! does not trust, and an output location may hold files no job of this coordinator wrote: so
//! a part is used only when it lies in the job's parts directory with the size recorded and a
//! footer that names the job and holds the rows recorded, a file already at an output name is
//! kept only when its footer names this job, and a manifest is replaced only when it is this
//! job's. Footers only: no row data is read here.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};
use nightshift_proto::layout::{DATA_EXT, ERROR_FILE_STEM, MANIFEST, SUCCESS, parts_dir};
use nightshift_proto::wire::Manifest;
use nightshift_storage::{
    FooterError, Location, Occupant, StorageError, Stores, occupant, owned_by, read_all, stamp,
};
use object_store::ObjectStoreExt;

use crate::finalizer::FinalizeError;
use crate::part_check::verify_object;
use nightshift_metastore::{JobRecord, PartRow};

/// Parts checked at once.
const VERIFY_CONCURRENCY: usize = 16;

/// Every part (and error part) lies in the job's parts directory or is one of the files merge
/// work wrote `in_place` at their output names, and those in `present` (the ones the commit
/// still reads) are there as recorded.
pub async fn verify_parts(
    out: &Location,
    job: &JobRecord,
    parts: &[PartRow],
    present: &HashSet<String>,
    in_place: &HashSet<String>,
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
                .filter(|rel| {
                    (rel.starts_with(&format!("{dir}/")) || in_place.contains(&uri))
                        && out.join(rel).uri() == uri
                })
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
                Ok(stamp) => owned_by(stamp, &job.uid, rows).map_err(bad),
                Err(FooterError::Storage(e)) => Err(FinalizeError::Storage(e)),
                Err(FooterError::NotParquet(e)) => Err(bad(format!("not a Parquet part: {e}"))),
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

/// Takes back what job `job_uid` published at `out`, when the manifest there is its own: its
/// `_SUCCESS` first (readers trust the output only while it is there), then the manifest. A
/// cancelled job holds no output: one cancelled while its commit published (or after a
/// coordinator died between publishing and recording the end) must not leave a committed
/// look, nor block the output's next job. Answers whether there was anything to take back.
pub async fn unpublish(out: &Location, job_uid: &str) -> Result<bool, StorageError> {
    let ours = own_manifest(out, job_uid).await?.is_some();
    if ours {
        for loc in [out.join(SUCCESS), out.join(MANIFEST)] {
            match loc.store().delete(loc.path()).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(StorageError::from_store(&loc.uri(), e)),
            }
        }
    }
    Ok(ours)
}

/// The manifest at `out`, when there is one and it is job `job_uid`'s.
pub(crate) async fn own_manifest(
    out: &Location,
    job_uid: &str,
) -> Result<Option<Manifest>, StorageError> {
    match read_all(&out.join(MANIFEST)).await {
        Ok(bytes) => Ok(serde_json::from_slice::<Manifest>(&bytes)
            .ok()
            .filter(|m| m.job_uid == job_uid)),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The size of the file at `dest` when an earlier attempt of this commit (or merge work, which
/// writes in place) wrote it: its footer names this job and holds `rows` rows. `None` when
/// there is no file; `Foreign` when there is one that is not provably this job's.
pub async fn owned_file(
    dest: &Location,
    job_uid: &str,
    rows: u64,
) -> Result<Option<u64>, FinalizeError> {
    match occupant(dest, job_uid, rows).await? {
        Occupant::Free => Ok(None),
        Occupant::Ours { bytes } => Ok(Some(bytes)),
        Occupant::Foreign { found, .. } => Err(FinalizeError::Foreign {
            uri: dest.uri(),
            found,
        }),
    }
}

/// Deletes the data files at `out`'s output names (`part-*`, `_errors/errors-*`) whose footer
/// names one of the jobs `job_uids`: their committed output, or what their merge work wrote in
/// place before they stopped. Files of any other job, or of none, stay. Each file's footer is
/// read once, however many jobs are named. Answers how many this call removed (one another
/// clean-up removed first is not counted, and is no error).
pub async fn remove_job_files(
    out: &Location,
    job_uids: &HashSet<&str>,
) -> Result<usize, StorageError> {
    let dirs = [
        out.clone(),
        out.join(ERROR_FILE_STEM.rsplit_once('/').map_or("", |(dir, _)| dir)),
    ];
    let mut removed = 0;
    for dir in dirs {
        for (name, size) in Stores::list_dir(&dir).await? {
            let loc = dir.join(&name);
            if !name.ends_with(&format!(".{DATA_EXT}")) {
                continue;
            }
            let owner = match stamp(&loc, size).await {
                Ok((owner, _)) => owner,
                Err(FooterError::Storage(e)) => return Err(e),
                Err(FooterError::NotParquet(_)) => None,
            };
            if let Some(owner) = owner
                && job_uids.contains(owner.as_str())
            {
                match loc.store().delete(loc.path()).await {
                    Ok(()) => removed += 1,
                    // Another clean-up of the same output removed it first.
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(StorageError::from_store(&loc.uri(), e)),
                }
            }
        }
    }
    Ok(removed)
}
