//! Resolving an input URI to its objects: a single file, a directory (prefix), or a glob.
//! Names starting with `_` or `.` are skipped in directories, as pyarrow and Spark do.

use futures::{StreamExt, TryStreamExt};
use globset::GlobBuilder;
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::error::StorageError;
use crate::location::{Location, Stores};

/// An input object as found when the job was planned.
#[derive(Debug, Clone)]
pub struct InputObject {
    pub location: Location,
    pub meta: ObjectMeta,
}

/// Characters that make an input URI a glob.
pub const GLOB_CHARS: [char; 4] = ['*', '?', '[', '{'];

/// The fixed directory of an input URI that every object it names lies under: the URI itself,
/// or for a glob the directory that holds its first wildcard (empty for a relative glob with
/// no directory).
pub fn input_base(uri: &str) -> &str {
    match uri.find(GLOB_CHARS) {
        Some(i) => &uri[..uri[..i].rfind('/').map(|j| j + 1).unwrap_or(0)],
        None => uri,
    }
}

/// The objects an input URI names, sorted by URI. Errors when nothing matches.
pub async fn list_inputs(stores: &Stores, uri: &str) -> Result<Vec<InputObject>, StorageError> {
    Ok(list_inputs_upto(stores, uri, usize::MAX).await?.objects)
}

/// The start of a listing.
#[derive(Debug)]
pub struct Listing {
    /// Every object the URI names, sorted by URI (when `complete`); otherwise `limit + 1` of
    /// them, in the order the store listed them.
    pub objects: Vec<InputObject>,
    /// Whether `objects` is the whole listing.
    pub complete: bool,
}

/// Lists at most `limit + 1` of the objects an input URI names: enough to tell whether there
/// are more than `limit`, without listing them all. Errors when nothing matches.
pub async fn list_inputs_upto(
    stores: &Stores,
    uri: &str,
    limit: usize,
) -> Result<Listing, StorageError> {
    let mut objects = match uri.find(GLOB_CHARS) {
        Some(_) => list_glob(stores, uri, limit).await?,
        None => list_plain(stores, uri, limit).await?,
    };
    if objects.is_empty() {
        return Err(StorageError::NoMatch {
            uri: uri.to_string(),
        });
    }
    let complete = objects.len() <= limit;
    if complete {
        objects.sort_by(|a, b| a.meta.location.cmp(&b.meta.location));
    }
    Ok(Listing { objects, complete })
}

async fn list_plain(
    stores: &Stores,
    uri: &str,
    limit: usize,
) -> Result<Vec<InputObject>, StorageError> {
    let loc = stores.locate(uri)?;
    if !uri.ends_with('/') {
        match loc.store().head(loc.path()).await {
            Ok(meta) => {
                return Ok(vec![InputObject {
                    location: loc,
                    meta,
                }]);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            // A local directory answers HEAD with an error that is not NotFound.
            Err(_) if loc.is_local() && std::path::Path::new(&loc.uri()).is_dir() => {}
            Err(e) => return Err(StorageError::from_store(uri, e)),
        }
    }
    let base = loc.clone();
    let objects = list_prefix(&loc, move |m| !hidden(&base, m), limit).await?;
    if objects.is_empty() {
        // Neither an object nor a non-empty prefix: say it is missing, not empty.
        let exists = loc.is_local() && std::path::Path::new(&loc.uri()).exists();
        if !exists {
            return Err(StorageError::NotFound {
                uri: uri.to_string(),
            });
        }
    }
    Ok(objects)
}

async fn list_glob(
    stores: &Stores,
    uri: &str,
    limit: usize,
) -> Result<Vec<InputObject>, StorageError> {
    // List from the directory that holds the first wildcard; match the rest of the path.
    let base_end = input_base(uri).len();
    let base_uri = if base_end == 0 { "." } else { &uri[..base_end] };
    let pattern = &uri[base_end..];
    let base = stores.locate(base_uri)?;
    let glob = GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| StorageError::BadUri {
            uri: uri.to_string(),
            reason: format!("bad glob: {e}"),
        })?
        .compile_matcher();
    let within = base.clone();
    let matches = move |m: &ObjectMeta| {
        within
            .relative(&m.location)
            .map(|rel| glob.is_match(&rel))
            .unwrap_or(false)
    };
    match list_prefix(&base, matches, limit).await {
        Err(StorageError::NotFound { .. }) => Ok(Vec::new()),
        other => other,
    }
}

/// The objects under `loc` that `keep` keeps, up to `limit + 1` of them.
async fn list_prefix(
    loc: &Location,
    keep: impl Fn(&ObjectMeta) -> bool,
    limit: usize,
) -> Result<Vec<InputObject>, StorageError> {
    if loc.is_local() && !std::path::Path::new(&loc.uri()).exists() {
        return Ok(Vec::new());
    }
    let prefix = (!loc.path().as_ref().is_empty()).then_some(loc.path());
    let metas: Vec<ObjectMeta> = loc
        .store()
        .list(prefix)
        .try_filter(|m| std::future::ready(keep(m)))
        .take(limit.saturating_add(1))
        .try_collect()
        .await
        .map_err(|e| StorageError::from_store(&loc.uri(), e))?;
    Ok(metas
        .into_iter()
        .map(|meta| InputObject {
            location: loc.at(meta.location.clone()),
            meta,
        })
        .collect())
}

/// Whether any part of the object's path below the listed prefix starts with `_` or `.`.
fn hidden(base: &Location, meta: &ObjectMeta) -> bool {
    base.relative(&meta.location)
        .map(|rel| {
            rel.split('/')
                .any(|p| p.starts_with('_') || p.starts_with('.'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::S3Settings;

    fn touch(dir: &std::path::Path, rel: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[tokio::test]
    async fn lists_files_dirs_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "a/1.parquet",
            "a/2.parquet",
            "a/_SUCCESS",
            "a/.crc",
            "a/sub/3.parquet",
        ] {
            touch(d, f);
        }
        let stores = Stores::new(S3Settings::default());
        let names = |v: Vec<InputObject>| {
            v.into_iter()
                .map(|o| o.location.uri().rsplit('/').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let base = d.to_str().unwrap();
        let one = list_inputs(&stores, &format!("{base}/a/1.parquet"))
            .await
            .unwrap();
        assert_eq!(names(one), ["1.parquet"]);
        let all = list_inputs(&stores, &format!("{base}/a")).await.unwrap();
        assert_eq!(names(all), ["1.parquet", "2.parquet", "3.parquet"]);
        let glob = list_inputs(&stores, &format!("{base}/a/*.parquet"))
            .await
            .unwrap();
        assert_eq!(names(glob), ["1.parquet", "2.parquet"]);
        let deep = list_inputs(&stores, &format!("{base}/a/**/*.parquet"))
            .await
            .unwrap();
        assert_eq!(names(deep).len(), 3);

        let none = list_inputs(&stores, &format!("{base}/a/*.csv"))
            .await
            .unwrap_err();
        assert!(matches!(none, StorageError::NoMatch { .. }), "{none}");
        assert!(none.to_string().contains("*.csv"));
        let missing = list_inputs(&stores, &format!("{base}/nope"))
            .await
            .unwrap_err();
        assert!(
            matches!(missing, StorageError::NotFound { .. }),
            "{missing}"
        );
        assert!(missing.to_string().contains("nope"));
        std::fs::create_dir(d.join("empty")).unwrap();
        let empty = list_inputs(&stores, &format!("{base}/empty"))
            .await
            .unwrap_err();
        assert!(matches!(empty, StorageError::NoMatch { .. }), "{empty}");
    }

    #[tokio::test]
    async fn a_listing_up_to_a_limit_says_whether_there_is_more() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["3.parquet", "1.parquet", "_SUCCESS", "2.parquet"] {
            touch(dir.path(), f);
        }
        let stores = Stores::new(S3Settings::default());
        let base = dir.path().to_str().unwrap();
        // Hidden names never count towards the limit.
        let whole = list_inputs_upto(&stores, base, 3).await.unwrap();
        assert!(whole.complete);
        let names: Vec<String> = whole.objects.iter().map(|o| o.location.uri()).collect();
        let expected: Vec<String> = (1..=3).map(|i| format!("{base}/{i}.parquet")).collect();
        assert_eq!(names, expected, "a whole listing is sorted");
        let glob = format!("{base}/*.parquet");
        let part = list_inputs_upto(&stores, &glob, 1).await.unwrap();
        assert!(!part.complete);
        assert_eq!(part.objects.len(), 2, "one past the limit, no more");
    }
}
