//! Resolving an input URI to its objects: a single file, a directory (prefix), or a glob.
//! Names starting with `_` or `.` are skipped in directories, as pyarrow and Spark do.

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use globset::GlobBuilder;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::{ObjectMeta, ObjectStoreExt};

use crate::error::StorageError;
use crate::location::{Location, Stores};

/// An input object as found when the job was planned.
#[derive(Debug, Clone)]
pub struct InputObject {
    pub location: Location,
    pub meta: ObjectMeta,
}

impl InputObject {
    /// An object a listing under `base` found.
    fn listed(base: &Location, meta: ObjectMeta) -> Self {
        Self {
            location: base.at(meta.location.clone()),
            meta,
        }
    }
}

/// The most keys S3 answers in one listing page.
const S3_PAGE_KEYS: usize = 1000;

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
    let source = Source::of(stores, uri).await?;
    let local = source.is_local();
    let glob = uri.contains(GLOB_CHARS);
    let listed = source.first(stores, limit.saturating_add(1)).await;
    let mut objects: Vec<InputObject> = match listed {
        // A glob under a place that does not exist matches nothing.
        Err(StorageError::NotFound { .. }) if glob => Vec::new(),
        other => other?,
    };
    if objects.is_empty() {
        // A plain URI that names nothing at all is missing, not empty.
        let exists = local && std::path::Path::new(&stores.locate(uri)?.uri()).exists();
        let missing = !glob && !exists;
        return Err(match missing {
            true => StorageError::NotFound {
                uri: uri.to_string(),
            },
            false => StorageError::NoMatch {
                uri: uri.to_string(),
            },
        });
    }
    let complete = objects.len() <= limit;
    if complete {
        objects.sort_by(|a, b| a.meta.location.cmp(&b.meta.location));
    }
    Ok(Listing { objects, complete })
}

/// The objects an input URI names, sorted by URI, as a stream.
pub struct InputStream {
    pub objects: BoxStream<'static, Result<InputObject, StorageError>>,
    /// How many there are, when known before the stream is read (a local listing).
    pub total: Option<u64>,
}

/// The objects an input URI names, sorted by URI, as a stream: an object store lists in key
/// order and is read a page at a time as the stream is consumed; a local directory lists in
/// no order, so it is read whole and sorted first. An input that names nothing is an empty
/// stream.
pub async fn stream_inputs(stores: &Stores, uri: &str) -> Result<InputStream, StorageError> {
    let source = Source::of(stores, uri).await?;
    if !source.is_local() {
        return Ok(InputStream {
            objects: source.objects(),
            total: None,
        });
    }
    let mut objects: Vec<InputObject> = source.objects().try_collect().await?;
    objects.sort_by(|a, b| a.meta.location.cmp(&b.meta.location));
    Ok(InputStream {
        total: Some(objects.len() as u64),
        objects: futures::stream::iter(objects.into_iter().map(Ok)).boxed(),
    })
}

/// Which objects of a store an input URI names.
enum Source {
    /// A plain URI naming one object.
    One(InputObject),
    /// The objects under `base` that `keep` keeps.
    Under {
        base: Location,
        keep: Box<dyn Fn(&ObjectMeta) -> bool + Send + Sync>,
    },
}

impl Source {
    async fn of(stores: &Stores, uri: &str) -> Result<Source, StorageError> {
        match uri.find(GLOB_CHARS) {
            Some(_) => Source::glob(stores, uri),
            None => Source::plain(stores, uri).await,
        }
    }

    /// An object, or else the objects under the URI whose names below it are not hidden.
    async fn plain(stores: &Stores, uri: &str) -> Result<Source, StorageError> {
        let loc = stores.locate(uri)?;
        if !uri.ends_with('/') {
            match loc.store().head(loc.path()).await {
                Ok(meta) => {
                    return Ok(Source::One(InputObject {
                        location: loc,
                        meta,
                    }));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                // A local directory answers HEAD with an error that is not NotFound.
                Err(_) if loc.is_local() && std::path::Path::new(&loc.uri()).is_dir() => {}
                Err(e) => return Err(StorageError::from_store(uri, e)),
            }
        }
        let base = loc.clone();
        Ok(Source::Under {
            base: loc,
            keep: Box::new(move |m| !marker(m) && !hidden(&base, m)),
        })
    }

    /// The objects below the directory that holds the first wildcard whose rest of the path
    /// matches the glob.
    fn glob(stores: &Stores, uri: &str) -> Result<Source, StorageError> {
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
        // Hidden names below the base are skipped as in a directory, unless the pattern
        // itself names one (`data/*/_meta.parquet`).
        let names_hidden = pattern.split('/').any(is_hidden_name);
        let within = base.clone();
        Ok(Source::Under {
            base,
            keep: Box::new(move |m: &ObjectMeta| {
                !marker(m)
                    && (names_hidden || !hidden(&within, m))
                    && within
                        .relative(&m.location)
                        .is_some_and(|rel| glob.is_match(&rel))
            }),
        })
    }

    /// At most `n` of the objects, in the order the store lists them. S3 is asked for pages no
    /// larger than that: a store's cost for a page grows with its keys (moto walks the whole
    /// bucket per page, then about half a millisecond per key it answers), whatever the
    /// caller keeps.
    async fn first(self, stores: &Stores, n: usize) -> Result<Vec<InputObject>, StorageError> {
        let s3 = match &self {
            Source::Under { base, .. } => stores.s3_client(base)?,
            Source::One(_) => None,
        };
        let (Some(s3), Source::Under { base, keep }) = (s3, &self) else {
            return self.objects().take(n).try_collect().await;
        };
        let prefix = (!base.path().as_ref().is_empty()).then(|| format!("{}/", base.path()));
        let mut opts = PaginatedListOptions {
            max_keys: Some(n.min(S3_PAGE_KEYS)),
            ..Default::default()
        };
        let mut found = Vec::new();
        loop {
            let page = s3
                .list_paginated(prefix.as_deref(), opts.clone())
                .await
                .map_err(|e| StorageError::from_store(&base.uri(), e))?;
            found.extend(
                page.result
                    .objects
                    .into_iter()
                    .filter(|m| keep(m))
                    .map(|meta| InputObject::listed(base, meta)),
            );
            match page.page_token {
                Some(token) if found.len() < n => opts.page_token = Some(token),
                _ => break,
            }
        }
        found.truncate(n);
        Ok(found)
    }

    fn is_local(&self) -> bool {
        match self {
            Source::One(o) => o.location.is_local(),
            Source::Under { base, .. } => base.is_local(),
        }
    }

    /// The objects, in the order the store lists them.
    fn objects(self) -> BoxStream<'static, Result<InputObject, StorageError>> {
        let (base, keep) = match self {
            Source::One(o) => return futures::stream::once(async { Ok(o) }).boxed(),
            Source::Under { base, keep } => (base, keep),
        };
        if base.is_local() && !std::path::Path::new(&base.uri()).exists() {
            return futures::stream::empty().boxed();
        }
        let prefix = (!base.path().as_ref().is_empty()).then(|| base.path().clone());
        let uri = base.uri();
        base.store()
            .list(prefix.as_ref())
            .try_filter(move |m| std::future::ready(keep(m)))
            .map(move |listed| match listed {
                Ok(meta) => Ok(InputObject::listed(&base, meta)),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(StorageError::NotFound { uri: uri.clone() })
                }
                Err(e) => Err(StorageError::from_store(&uri, e)),
            })
            .boxed()
    }
}

/// Whether any part of the object's path below the listed prefix is hidden: `_SUCCESS`,
/// `_temporary/`, `_parts/`, `.crc` files, as Spark and Hive skip them.
fn hidden(base: &Location, meta: &ObjectMeta) -> bool {
    base.relative(&meta.location)
        .map(|rel| rel.split('/').any(is_hidden_name))
        .unwrap_or(false)
}

fn is_hidden_name(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('.')
}

/// An empty object in a listing: the "folder" an S3 console makes (key `data/2024/`, which
/// lists as `data/2024`), or an empty file. Neither can be a Parquet file, so neither is input.
fn marker(meta: &ObjectMeta) -> bool {
    meta.size == 0
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
            "a/_temporary/0/4.parquet",
            "a/sub/.5.parquet",
        ] {
            touch(d, f);
        }
        std::fs::write(d.join("a/empty.parquet"), b"").unwrap();
        touch(d, "b/x/_meta.parquet");
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
        assert_eq!(
            names(deep),
            ["1.parquet", "2.parquet", "3.parquet"],
            "hidden and empty objects are no input"
        );
        let named = list_inputs(&stores, &format!("{base}/b/*/_meta.parquet"))
            .await
            .unwrap();
        assert_eq!(names(named), ["_meta.parquet"], "a pattern may name one");

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
