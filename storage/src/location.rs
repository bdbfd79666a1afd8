//! URIs to objects: `s3://bucket/key`, `file:///abs/path`, or a plain local path.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use object_store::ObjectStore;
use object_store::aws::AmazonS3;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

use crate::error::StorageError;
use crate::open_uploads::{OpenUpload, S3Bucket};
use crate::s3::S3Settings;

/// One object (or prefix) and the store that holds it.
#[derive(Clone)]
pub struct Location {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// Scheme and root: `s3://bucket` or empty for local files.
    root: String,
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

impl Location {
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_local(&self) -> bool {
        self.root.is_empty()
    }

    /// The full URI, in the form it was given (local paths absolute).
    pub fn uri(&self) -> String {
        if self.is_local() {
            format!("/{}", self.path)
        } else if self.path.as_ref().is_empty() {
            self.root.clone()
        } else {
            format!("{}/{}", self.root, self.path)
        }
    }

    /// The same store at another path.
    pub fn at(&self, path: Path) -> Location {
        Location {
            store: self.store.clone(),
            path,
            root: self.root.clone(),
        }
    }

    /// A child of this prefix: `rel` may hold several `/`-separated parts.
    pub fn join(&self, rel: &str) -> Location {
        let mut path = self.path.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        self.at(path)
    }

    /// The path of `other` relative to this prefix, if it lies under it.
    pub fn relative(&self, other: &Path) -> Option<String> {
        let parts: Vec<_> = other.prefix_match(&self.path)?.collect();
        Some(
            parts
                .iter()
                .map(|p| p.as_ref())
                .collect::<Vec<_>>()
                .join("/"),
        )
    }
}

/// Builds and caches stores: one local filesystem, one S3 client per bucket.
pub struct Stores {
    local: Arc<dyn ObjectStore>,
    s3: S3Settings,
    buckets: Mutex<HashMap<String, Arc<S3Bucket>>>,
}

impl Default for Stores {
    fn default() -> Self {
        Self::new(S3Settings::from_env())
    }
}

impl Stores {
    pub fn new(s3: S3Settings) -> Self {
        Self {
            local: Arc::new(LocalFileSystem::new()),
            s3,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves a URI. Relative local paths are taken from the current directory.
    pub fn locate(&self, uri: &str) -> Result<Location, StorageError> {
        let bad = |reason: &str| StorageError::BadUri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if let Some((bucket, path)) = parse_s3(uri)? {
            return Ok(Location {
                store: self.bucket(uri, bucket)?.store(),
                path,
                root: format!("s3://{bucket}"),
            });
        }
        if let Some((scheme, _)) = uri.split_once("://")
            && scheme != "file"
        {
            return Err(bad(&format!(
                "scheme `{scheme}` is not supported (use s3:// or a local path)"
            )));
        }
        let local = uri.strip_prefix("file://").unwrap_or(uri);
        let abs = absolute(local).map_err(|e| bad(&e))?;
        let path =
            Path::from_absolute_path(&abs).map_err(|e| bad(&format!("invalid local path: {e}")))?;
        Ok(Location {
            store: self.local.clone(),
            path,
            root: String::new(),
        })
    }

    fn bucket(&self, uri: &str, bucket: &str) -> Result<Arc<S3Bucket>, StorageError> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = buckets.get(bucket) {
            return Ok(s.clone());
        }
        let built = self.s3.build(bucket).map_err(|e| StorageError::Config {
            uri: uri.to_string(),
            message: e.to_string(),
        })?;
        let built = Arc::new(built);
        buckets.insert(bucket.to_string(), built.clone());
        Ok(built)
    }

    /// Multipart uploads left open under `prefix` (always none for local files).
    pub async fn open_uploads(&self, prefix: &Location) -> Result<Vec<OpenUpload>, StorageError> {
        match self.s3_bucket(prefix)? {
            Some(b) => b.open_uploads(prefix.path()).await,
            None => Ok(Vec::new()),
        }
    }

    /// Aborts the multipart uploads left open under `prefix`; answers how many.
    pub async fn abort_open_uploads(&self, prefix: &Location) -> Result<usize, StorageError> {
        match self.s3_bucket(prefix)? {
            Some(b) => b.abort_open_uploads(prefix.path(), |_| true).await,
            None => Ok(0),
        }
    }

    /// The objects directly in `dir` (no deeper), by name, with their sizes.
    pub async fn list_dir(dir: &Location) -> Result<Vec<(String, u64)>, StorageError> {
        let listed = dir
            .store()
            .list_with_delimiter(Some(dir.path()))
            .await
            .map_err(|e| StorageError::from_store(&dir.uri(), e))?;
        Ok(listed
            .objects
            .into_iter()
            .map(|m| {
                (
                    m.location.filename().unwrap_or_default().to_string(),
                    m.size,
                )
            })
            .collect())
    }

    /// Clears what writers killed mid-write left at the objects `names` (relative to `out`):
    /// their open multipart uploads on S3, their staging files (`NAME#N`) locally, which no
    /// listing shows. Answers how many.
    pub async fn clear_unfinished(
        &self,
        out: &Location,
        names: &[String],
    ) -> Result<usize, StorageError> {
        let keys: HashSet<String> = names
            .iter()
            .map(|n| out.join(n).path().to_string())
            .collect();
        if let Some(b) = self.s3_bucket(out)? {
            return b.abort_open_uploads(out.path(), |k| keys.contains(k)).await;
        }
        let paths: HashSet<PathBuf> = names
            .iter()
            .map(|n| PathBuf::from(out.join(n).uri()))
            .collect();
        tokio::task::spawn_blocking(move || remove_staged(&paths))
            .await
            .map_err(|e| StorageError::Request {
                uri: out.uri(),
                message: e.to_string(),
            })
    }

    /// The S3 client of a location's bucket, for the requests `ObjectStore` cannot shape (a
    /// listing page of a chosen size); none for a local location.
    pub(crate) fn s3_client(&self, loc: &Location) -> Result<Option<Arc<AmazonS3>>, StorageError> {
        Ok(self.s3_bucket(loc)?.map(|b| b.store.clone()))
    }

    fn s3_bucket(&self, loc: &Location) -> Result<Option<Arc<S3Bucket>>, StorageError> {
        match loc.root.strip_prefix("s3://") {
            Some(bucket) => self.bucket(&loc.uri(), bucket).map(Some),
            None => Ok(None),
        }
    }
}

/// An absolute, lexically normalized path (`.` and `..` folded) without touching the disk, so
/// that globs and not-yet-existing outputs resolve too.
fn absolute(p: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::Path::new(p);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("no current directory: {e}"))?
            .join(path)
    };
    let mut out = std::path::PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// The bucket and key of an `s3://` (or `s3a://`) URI; `None` for any other URI.
fn parse_s3(uri: &str) -> Result<Option<(&str, Path)>, StorageError> {
    let Some(rest) = uri
        .strip_prefix("s3://")
        .or_else(|| uri.strip_prefix("s3a://"))
    else {
        return Ok(None);
    };
    let bad = |reason: String| StorageError::BadUri {
        uri: uri.to_string(),
        reason,
    };
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket name".into()));
    }
    let path =
        Path::parse(key.trim_end_matches('/')).map_err(|e| bad(format!("invalid key: {e}")))?;
    Ok(Some((bucket, path)))
}

/// An object store URI in the one form `Location::uri` gives for the objects it names
/// (`s3a://` read as `s3://`, no leading or trailing `/` on the key), so that two spellings of
/// one place compare equal; a local path or a URI that names no object unchanged.
pub fn canonical_uri(uri: &str) -> String {
    match parse_s3(uri) {
        Ok(Some((bucket, path))) if path.as_ref().is_empty() => format!("s3://{bucket}"),
        Ok(Some((bucket, path))) => format!("s3://{bucket}/{path}"),
        _ => uri.to_string(),
    }
}

/// Whether a URI is a local path (not an object store URL).
pub fn is_local_uri(uri: &str) -> bool {
    !uri.contains("://") || uri.starts_with("file://")
}

/// A local URI made absolute; other URIs unchanged.
pub fn absolutize(uri: &str) -> String {
    if !is_local_uri(uri) {
        return uri.to_string();
    }
    let local = uri.strip_prefix("file://").unwrap_or(uri);
    match absolute(local) {
        Ok(p) => {
            let mut s = p.to_string_lossy().into_owned();
            if local.ends_with('/') && !s.ends_with('/') {
                s.push('/');
            }
            s
        }
        Err(_) => uri.to_string(),
    }
}

/// A local URI made absolute with the links along its existing leading directories resolved
/// (a glob's pattern and a tail that does not exist yet are kept as written), so that a check of
/// where it leads sees the real place. Other URIs unchanged.
pub fn resolve_links(uri: &str) -> String {
    if !is_local_uri(uri) {
        return uri.to_string();
    }
    let abs = absolutize(uri);
    let trailing = abs.ends_with('/');
    let parts: Vec<&std::ffi::OsStr> = std::path::Path::new(&abs)
        .components()
        .map(|c| c.as_os_str())
        .collect();
    let fixed = parts
        .iter()
        .position(|p| {
            p.to_string_lossy()
                .contains(crate::input_listing::GLOB_CHARS)
        })
        .unwrap_or(parts.len());
    for k in (1..=fixed).rev() {
        let prefix: std::path::PathBuf = parts[..k].iter().collect();
        if let Ok(mut real) = std::fs::canonicalize(&prefix) {
            real.extend(&parts[k..]);
            let mut s = real.to_string_lossy().into_owned();
            if trailing && !s.ends_with('/') {
                s.push('/');
            }
            return s;
        }
    }
    abs
}

/// `path` is a regular file (not a link) whose real path is `root`'s real path followed by the
/// rest of `path`: no component between them is a link.
pub fn plain_file_inside(root: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(root.trim_end_matches('/')) else {
        return false;
    };
    let is_file = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
    let real_root = std::fs::canonicalize(root);
    let real = std::fs::canonicalize(path);
    match (is_file, real_root, real) {
        (true, Ok(r), Ok(p)) => p.as_os_str().to_string_lossy() == format!("{}{rest}", r.display()),
        _ => false,
    }
}

/// Removes the local staging files (`PATH#N`, N digits) of `paths`; answers how many.
fn remove_staged(paths: &HashSet<PathBuf>) -> usize {
    let dirs: HashSet<&std::path::Path> = paths.iter().filter_map(|p| p.parent()).collect();
    let staged_of = |entry: &std::path::Path| {
        let name = entry.file_name()?.to_str()?;
        let (base, suffix) = name.rsplit_once('#')?;
        let digits = !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit());
        (digits && paths.contains(&entry.with_file_name(base))).then_some(())
    };
    let mut removed = 0;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if staged_of(&path).is_some() && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_s3_place_have_one_canonical_form_and_locate_there() {
        let stores = Stores::new(crate::s3::S3Settings::default());
        for uri in [
            "s3://b/out/a",
            "s3a://b/out/a",
            "s3://b//out/a/",
            "s3a://b/out/a//",
        ] {
            assert_eq!(canonical_uri(uri), "s3://b/out/a", "{uri}");
            assert_eq!(stores.locate(uri).unwrap().uri(), "s3://b/out/a", "{uri}");
        }
        assert_eq!(canonical_uri("s3a://b/"), "s3://b");
        // Not an object store URI, or not a valid one: unchanged (locate says what is wrong).
        for uri in [
            "/data/out/",
            "file:///data/out",
            "s3://",
            "s3://b/a//c",
            "gs://b/k",
        ] {
            assert_eq!(canonical_uri(uri), uri);
        }
        assert!(stores.locate("s3://b/a//c").is_err());
    }

    #[test]
    fn links_resolve_up_to_the_glob_or_what_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap().join("real");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let l = link.to_string_lossy();
        let r = real.to_string_lossy();
        assert_eq!(
            resolve_links(&format!("{l}/x/*.parquet")),
            format!("{r}/x/*.parquet")
        );
        assert_eq!(
            resolve_links(&format!("{l}/new/out/")),
            format!("{r}/new/out/")
        );
        assert_eq!(resolve_links(&l), r.to_string());
        assert_eq!(resolve_links("s3://b/k/"), "s3://b/k/");
    }

    #[test]
    fn links_out_of_the_parts_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        let parts = root.join("_parts/u");
        std::fs::create_dir_all(&parts).unwrap();
        std::fs::write(parts.join("a.parquet"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), parts.join("b.parquet")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("_parts/v")).unwrap();
        let root_s = root.to_string_lossy().to_string();
        let at = |rel: &str| root.join(rel).to_string_lossy().to_string();
        assert!(plain_file_inside(&root_s, &at("_parts/u/a.parquet")));
        assert!(
            !plain_file_inside(&root_s, &at("_parts/u/b.parquet")),
            "a link"
        );
        assert!(
            !plain_file_inside(&root_s, &at("_parts/v/secret")),
            "a linked dir"
        );
        assert!(
            !plain_file_inside(&root_s, &at("_parts/u/none.parquet")),
            "missing"
        );
        assert!(!plain_file_inside(&root_s, "/etc/passwd"), "elsewhere");
    }

    #[test]
    fn local_paths_become_absolute_and_join() {
        let stores = Stores::new(S3Settings::default());
        let loc = stores.locate("/tmp/a/../b/out/").unwrap();
        assert!(loc.is_local());
        assert_eq!(loc.uri(), "/tmp/b/out");
        assert_eq!(
            loc.join("_parts/x.parquet").uri(),
            "/tmp/b/out/_parts/x.parquet"
        );
        let child = loc.join("_parts/x.parquet");
        assert_eq!(loc.relative(child.path()).unwrap(), "_parts/x.parquet");
        let rel = stores.locate("rel/dir").unwrap();
        assert!(rel.uri().ends_with("/rel/dir"));
    }

    #[test]
    fn s3_uris_name_bucket_and_key() {
        let stores = Stores::new(S3Settings::default());
        let loc = stores.locate("s3://bucket/some/prefix/").unwrap();
        assert_eq!(loc.uri(), "s3://bucket/some/prefix");
        assert!(!loc.is_local());
        assert!(matches!(
            stores.locate("s3:///key"),
            Err(StorageError::BadUri { .. })
        ));
        let e = stores.locate("gs://b/k").unwrap_err().to_string();
        assert!(e.contains("gs"), "{e}");
    }

    #[test]
    fn absolutize_keeps_trailing_slash() {
        assert!(absolutize("out/x/").ends_with("/out/x/"));
        assert_eq!(absolutize("s3://b/k"), "s3://b/k");
    }
}
