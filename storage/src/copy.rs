//! Copying an object to another key of the same store: a server-side copy on S3, and locally a
//! real copy (the kernel may share blocks, a reflink, but never a hard link), so that a
//! committed file never shares its inode with a part a worker could still change, and a link
//! planted where the source should be is refused rather than followed.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use object_store::ObjectStoreExt;

use crate::error::StorageError;
use crate::location::Location;
use crate::part_upload::sync_local;

/// Copies `src` to `dest` (same store), replacing `dest`; answers the bytes copied.
pub async fn copy_object(src: &Location, dest: &Location) -> Result<u64, StorageError> {
    if !(src.is_local() && dest.is_local()) {
        src.store()
            .copy(src.path(), dest.path())
            .await
            .map_err(|e| StorageError::from_store(&dest.uri(), e))?;
        let meta = dest
            .store()
            .head(dest.path())
            .await
            .map_err(|e| StorageError::from_store(&dest.uri(), e))?;
        return Ok(meta.size);
    }
    let (from, to) = (PathBuf::from(src.uri()), PathBuf::from(dest.uri()));
    let copied = tokio::task::spawn_blocking(move || copy_file(&from, &to))
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
    let bytes = copied.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StorageError::NotFound { uri: src.uri() },
        _ => StorageError::Io {
            uri: dest.uri(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            },
        },
    })?;
    sync_local(dest).await?;
    Ok(bytes)
}

/// Opens `from` without following a link, copies it to a temporary sibling of `to` and renames
/// that into place.
fn copy_file(from: &Path, to: &Path) -> io::Result<u64> {
    let mut source = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    if !source.metadata()?.is_file() {
        return Err(io::Error::other(format!(
            "`{}` is not a plain file",
            from.display()
        )));
    }
    let dir = to
        .parent()
        .ok_or_else(|| io::Error::other("destination has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let staged = dir.join(format!(
        ".{}.copying",
        to.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut target = std::fs::File::create(&staged)?;
    let bytes = io::copy(&mut source, &mut target)?;
    target.sync_all()?;
    std::fs::rename(&staged, to)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::location::Stores;
    use crate::s3::S3Settings;

    #[tokio::test]
    async fn local_copies_are_real_and_refuse_links() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(S3Settings::default());
        let src = dir.path().join("a.parquet");
        std::fs::write(&src, b"hello").unwrap();
        let at = |p: &Path| stores.locate(&p.to_string_lossy()).unwrap();
        let dest = dir.path().join("out/b.parquet");
        assert_eq!(copy_object(&at(&src), &at(&dest)).await.unwrap(), 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let (a, b) = (
            std::fs::metadata(&src).unwrap(),
            std::fs::metadata(&dest).unwrap(),
        );
        assert_ne!(a.ino(), b.ino(), "a hard link");
        assert_eq!(b.nlink(), 1);
        let link = dir.path().join("link.parquet");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let e = copy_object(&at(&link), &at(&dir.path().join("out/c.parquet"))).await;
        assert!(e.is_err(), "a link was followed");
    }
}
