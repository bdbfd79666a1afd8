//! Publishing a finished object under another key of the same store without reading it: a
//! server-side copy on S3 (the source stays until the job's parts are collected), and locally
//! a rename (O(1), whatever the size). The local source must be a plain file reached through
//! no link, and what lands at the destination must be the very file checked (same device and
//! inode), so a link or a file swapped in between is refused, never published.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use object_store::ObjectStoreExt;

use crate::error::StorageError;
use crate::location::Location;
use crate::part_upload::sync_local;

/// Puts `src` at `dest` (same store), replacing `dest`; answers its size. Locally `src` is
/// moved, on S3 copied.
pub async fn publish_object(src: &Location, dest: &Location) -> Result<u64, StorageError> {
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
    let moved = tokio::task::spawn_blocking(move || move_file(&from, &to))
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
    let bytes = moved.map_err(|e| match e.kind() {
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

/// Renames `from` (a plain file, opened without following a link) to `to`, and checks that the
/// file now at `to` is the one opened; a file that is not is removed again and refused.
fn move_file(from: &Path, to: &Path) -> io::Result<u64> {
    let source = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(from)?;
    let opened = source.metadata()?;
    if !opened.is_file() {
        return Err(io::Error::other(format!(
            "`{}` is not a plain file",
            from.display()
        )));
    }
    let dir = to
        .parent()
        .ok_or_else(|| io::Error::other("destination has no directory"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::rename(from, to)?;
    let landed = std::fs::symlink_metadata(to)?;
    if !landed.is_file() || (landed.dev(), landed.ino()) != (opened.dev(), opened.ino()) {
        std::fs::remove_file(to)?;
        return Err(io::Error::other(format!(
            "`{}` was replaced while it was published",
            from.display()
        )));
    }
    Ok(landed.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::Stores;
    use crate::s3::S3Settings;

    #[tokio::test]
    async fn local_files_are_moved_and_links_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(S3Settings::default());
        let src = dir.path().join("a.parquet");
        std::fs::write(&src, b"hello").unwrap();
        let inode = std::fs::metadata(&src).unwrap().ino();
        let at = |p: &Path| stores.locate(&p.to_string_lossy()).unwrap();
        let dest = dir.path().join("out/b.parquet");
        assert_eq!(publish_object(&at(&src), &at(&dest)).await.unwrap(), 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert!(!src.exists(), "moved, not copied");
        let landed = std::fs::metadata(&dest).unwrap();
        assert_eq!((landed.ino(), landed.nlink()), (inode, 1));
        let link = dir.path().join("link.parquet");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let c = dir.path().join("out/c.parquet");
        let e = publish_object(&at(&link), &at(&c)).await;
        assert!(e.is_err(), "a link was followed");
        assert!(!c.exists() && link.exists());
        let gone = publish_object(&at(&src), &at(&c)).await;
        assert!(
            matches!(gone, Err(StorageError::NotFound { .. })),
            "{gone:?}"
        );
    }
}
