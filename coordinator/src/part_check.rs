//! What a worker says about a part is checked before the part is recorded, and again before
//! the commit reads it: the counts add up and fit the shard; the part and its error part are
//! exactly the objects the lease may write (`OUTPUT/_parts/<job_uid>/s<shard>-t<token>-r<row>`,
//! see `nightshift_proto::layout`, or the output names merge work was given), they exist with
//! the sizes reported, and locally no link leads out of the job's parts directory; a file
//! written in place has a footer that names the job and holds the rows. So a worker token
//! cannot publish a file from anywhere else, another shard's part, or a count that does not
//! add up.

use nightshift_proto::spec_check::MAX_TEXT_TOKENS;
use nightshift_proto::wire::{LeaseRef, ManifestField, PartRecord, part_object};
use nightshift_storage::location::plain_file_inside;
use nightshift_storage::{
    FooterError, Location, StorageError, Stores, owned_by, read_footer, stamp_of,
};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};

use crate::finalizer::manifest_fields;
use object_store::ObjectStoreExt;

use nightshift_metastore::LeaseHolder;

#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error("a part must cover at least one row")]
    Empty,
    #[error("a part's error_rows ({error_rows}) exceed its rows ({rows})")]
    TooManyErrors { rows: u64, error_rows: u64 },
    #[error("a part of {rows} rows from row {start} does not fit in the shard's {shard_rows} rows")]
    OutsideShard {
        start: u64,
        rows: u64,
        shard_rows: u64,
    },
    #[error("a part with {error_rows} error rows must name an error part, and only then")]
    ErrorPartMismatch { error_rows: u64 },
    #[error(
        "a part's tokens do not add up: {real} real, {padded} padded (at most {most}), \
         {truncated_rows} texts truncated of {rows} rows"
    )]
    BadTokens {
        real: u64,
        padded: u64,
        most: u64,
        truncated_rows: u64,
        rows: u64,
    },
    #[error(
        "{field} `{got}` is not `{expected}`: a lease writes only under its job's own _parts/ \
         prefix, under the name its shard, token and first row give"
    )]
    WrongUri {
        field: &'static str,
        got: String,
        expected: String,
    },
    #[error("part `{uri}` does not exist")]
    Missing { uri: String },
    #[error("part `{uri}` holds {actual} bytes, not the {reported} reported")]
    WrongSize {
        uri: String,
        actual: u64,
        reported: u64,
    },
    #[error("part `{uri}` is not a plain file inside its job's parts directory")]
    Escapes { uri: String },
    #[error("`{uri}` is not this job's file of {rows} rows: {found}")]
    NotOurs {
        uri: String,
        rows: u64,
        found: String,
    },
    /// The object store could not be asked: not the worker's fault.
    #[error(transparent)]
    Storage(StorageError),
}

impl PartError {
    /// The object store failed, rather than the part being wrong.
    pub fn is_storage(&self) -> bool {
        matches!(self, PartError::Storage(_))
    }
}

/// The counts of a part fit together and inside its shard.
pub fn check_counts(part: &PartRecord, shard_rows: u64) -> Result<(), PartError> {
    if part.rows == 0 {
        return Err(PartError::Empty);
    }
    if part.error_rows > part.rows {
        return Err(PartError::TooManyErrors {
            rows: part.rows,
            error_rows: part.error_rows,
        });
    }
    if part
        .row_start
        .checked_add(part.rows)
        .is_none_or(|end| end > shard_rows)
    {
        return Err(PartError::OutsideShard {
            start: part.row_start,
            rows: part.rows,
            shard_rows,
        });
    }
    if part.error_uri.is_some() != (part.error_rows > 0)
        || (part.error_uri.is_none() && part.error_bytes > 0)
    {
        return Err(PartError::ErrorPartMismatch {
            error_rows: part.error_rows,
        });
    }
    check_tokens(part)
}

/// A text part's tokens: real ones within the padded ones, padded ones within its rows at the
/// longest a text may be, truncated texts within its rows.
fn check_tokens(part: &PartRecord) -> Result<(), PartError> {
    let Some(t) = part.tokens else {
        return Ok(());
    };
    let most = part.rows.saturating_mul(u64::from(MAX_TEXT_TOKENS));
    if t.real > t.padded || t.padded > most || t.truncated_rows > part.rows {
        return Err(PartError::BadTokens {
            real: t.real,
            padded: t.padded,
            most,
            truncated_rows: t.truncated_rows,
            rows: part.rows,
        });
    }
    Ok(())
}

/// The part (and error part) are the objects this lease may write (`part_object`), and exist as
/// reported. Answers the output schema of an output file written in place. Merge work may also
/// put a file under the lease's own part name, as workers that predate output names
/// (`MergeFiles`) do: the commit then publishes it, as it does merge work planned before files
/// were numbered.
pub async fn check_objects(
    stores: &Stores,
    holder: &LeaseHolder,
    lease: &LeaseRef,
    part: &PartRecord,
) -> Result<Option<Vec<ManifestField>>, PartError> {
    let out = stores
        .locate(&holder.output_uri)
        .map_err(PartError::Storage)?;
    let uid = &holder.job_uid;
    let row_start = part.row_start;
    let merge_files = holder.merge_files.as_ref();
    // Where the file may be, relative to the output, and whether that is an output name.
    let place = |field, got: &str, errors| {
        let name = part_object(uid, lease, row_start, errors, merge_files);
        let own = part_object(uid, lease, row_start, errors, None);
        let in_place = name != own;
        if got == out.join(&name).uri() {
            Ok((name, in_place))
        } else if in_place && got == out.join(&own).uri() {
            Ok((own, false))
        } else {
            Err(PartError::WrongUri {
                field,
                got: nightshift_proto::excerpt(got),
                expected: out.join(&name).uri(),
            })
        }
    };
    let (main, in_place) = place("part uri", &part.uri, false)?;
    verify_object(&out, &main, part.bytes).await?;
    let mut schema = None;
    if in_place {
        let rows = part.rows - part.error_rows;
        schema = Some(check_stamp(&out.join(&main), part.bytes, uid, rows).await?);
    }
    if let Some(error_uri) = &part.error_uri {
        let (errors, in_place) = place("error_uri", error_uri, true)?;
        verify_object(&out, &errors, part.error_bytes).await?;
        if in_place {
            check_stamp(&out.join(&errors), part.error_bytes, uid, part.error_rows).await?;
        }
    }
    Ok(schema)
}

/// A file merge work wrote in place, at an output name, is this job's and holds `rows` rows
/// (its footer says so): checked once, here, so that the commit only needs to find it
/// unchanged (`finalizer.rs`). Answers its schema as the manifest lists it.
async fn check_stamp(
    loc: &Location,
    bytes: u64,
    job_uid: &str,
    rows: u64,
) -> Result<Vec<ManifestField>, PartError> {
    let not_ours = |found: String| PartError::NotOurs {
        uri: loc.uri(),
        rows,
        found,
    };
    let footer = read_footer(loc, bytes).await.map_err(|e| match e {
        FooterError::Storage(e) => PartError::Storage(e),
        FooterError::NotParquet(e) => not_ours(format!("not a Parquet file: {e}")),
    })?;
    owned_by(stamp_of(&footer), job_uid, rows).map_err(not_ours)?;
    let arrow = ArrowReaderMetadata::try_new(footer, ArrowReaderOptions::new())
        .map_err(|e| not_ours(format!("no Arrow schema: {e}")))?;
    Ok(manifest_fields(arrow.schema()))
}

/// The object at `rel` under the output `out` exists with `bytes` bytes; locally it is a plain
/// file reached through no link (so what is read is what lies under `out`).
pub async fn verify_object(out: &Location, rel: &str, bytes: u64) -> Result<(), PartError> {
    let loc = out.join(rel);
    let uri = loc.uri();
    if loc.is_local() {
        let (root, path) = (out.uri(), uri.clone());
        let inside = tokio::task::spawn_blocking(move || plain_file_inside(&root, &path))
            .await
            .unwrap_or(false);
        if !inside {
            return Err(PartError::Escapes { uri });
        }
    }
    let meta = match loc.store().head(loc.path()).await {
        Ok(meta) => meta,
        Err(e) => {
            return Err(match StorageError::from_store(&uri, e) {
                StorageError::NotFound { uri } => PartError::Missing { uri },
                other => PartError::Storage(other),
            });
        }
    };
    if meta.size != bytes {
        return Err(PartError::WrongSize {
            uri,
            actual: meta.size,
            reported: bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(row_start: u64, rows: u64, error_rows: u64) -> PartRecord {
        PartRecord {
            uri: String::new(),
            row_start,
            rows,
            bytes: 10,
            error_rows,
            error_uri: (error_rows > 0).then(|| "e".to_string()),
            error_bytes: 0,
            tokens: None,
        }
    }

    #[test]
    fn counts_must_add_up() {
        assert!(check_counts(&part(0, 10, 2), 10).is_ok());
        assert!(matches!(
            check_counts(&part(0, 0, 0), 10),
            Err(PartError::Empty)
        ));
        assert!(matches!(
            check_counts(&part(0, 5, 6), 10),
            Err(PartError::TooManyErrors { .. })
        ));
        assert!(matches!(
            check_counts(&part(5, 6, 0), 10),
            Err(PartError::OutsideShard { .. })
        ));
        assert!(matches!(
            check_counts(&part(u64::MAX, 2, 0), 10),
            Err(PartError::OutsideShard { .. })
        ));
        let mut no_error_part = part(0, 5, 1);
        no_error_part.error_uri = None;
        assert!(matches!(
            check_counts(&no_error_part, 10),
            Err(PartError::ErrorPartMismatch { .. })
        ));
    }
}
