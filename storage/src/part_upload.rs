//! Streaming upload of one output object that never overwrites: small objects go up in one
//! create-only PUT; once the data outgrows the buffer it streams as a multipart upload, which
//! is refused before it completes if an object reached the name meanwhile (a part's key is
//! unique per shard, row range and fencing token; merge work writes at output names, where a
//! cancelled job's late worker may write too). A failed or abandoned upload is aborted, not
//! left to bill.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use parquet::arrow::async_writer::AsyncFileWriter;
use parquet::errors::ParquetError;

use crate::error::StorageError;
use crate::location::Location;

/// Data above this switches from one PUT to a multipart upload.
const SINGLE_PUT_MAX: usize = 16 * 1024 * 1024;
/// Size of each multipart chunk.
const CHUNK: usize = 8 * 1024 * 1024;
/// Chunks in flight at once.
const CONCURRENCY: usize = 4;

pub struct PartUpload {
    location: Location,
    buffer: Vec<Bytes>,
    buffered: usize,
    upload: Option<WriteMultipart>,
    written: Arc<AtomicU64>,
}

impl PartUpload {
    pub fn new(location: Location) -> Self {
        Self {
            location,
            buffer: Vec::new(),
            buffered: 0,
            upload: None,
            written: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes handed to the upload so far; final once `complete` returned.
    pub fn bytes_counter(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    async fn start_multipart(&mut self) -> Result<(), StorageError> {
        let uri = self.location.uri();
        let upload = self
            .location
            .store()
            .put_multipart_opts(self.location.path(), Default::default())
            .await
            .map_err(|e| StorageError::from_store(&uri, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        for b in self.buffer.drain(..) {
            w.put(b);
        }
        self.buffered = 0;
        self.upload = Some(w);
        Ok(())
    }

    async fn write_bytes(&mut self, bs: Bytes) -> Result<(), StorageError> {
        self.written.fetch_add(bs.len() as u64, Ordering::Relaxed);
        if self.upload.is_none() {
            self.buffered += bs.len();
            self.buffer.push(bs);
            if self.buffered > SINGLE_PUT_MAX {
                self.start_multipart().await?;
            }
            return Ok(());
        }
        let uri = self.location.uri();
        if let Some(w) = self.upload.as_mut() {
            w.wait_for_capacity(CONCURRENCY)
                .await
                .map_err(|e| StorageError::from_store(&uri, e))?;
            w.put(bs);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StorageError> {
        let uri = self.location.uri();
        match self.upload.take() {
            Some(w) => {
                if let Err(e) = refuse_existing(&self.location).await {
                    self.upload = Some(w);
                    self.abort().await;
                    return Err(e);
                }
                w.finish()
                    .await
                    .map_err(|e| StorageError::from_store(&uri, e))?;
            }
            None => {
                let payload: PutPayload = self.buffer.drain(..).collect();
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                self.location
                    .store()
                    .put_opts(self.location.path(), payload, opts)
                    .await
                    .map_err(|e| StorageError::from_store(&uri, e))?;
            }
        }
        sync_local(&self.location).await
    }

    /// Abandons the object: a multipart upload in progress is aborted.
    pub async fn abort(&mut self) {
        self.buffer.clear();
        if let Some(w) = self.upload.take()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(uri = %self.location, error = %e, "aborting multipart upload failed");
        }
    }
}

/// `AlreadyExists` when an object is at the name. A multipart upload cannot be made
/// create-only, so one that a file reached while it ran (merge work writes at output names) is
/// refused here, before it completes: only in the time between this check and the completion
/// can it still replace one.
async fn refuse_existing(location: &Location) -> Result<(), StorageError> {
    let uri = location.uri();
    match location.store().head(location.path()).await {
        Ok(_) => Err(StorageError::AlreadyExists { uri }),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(StorageError::from_store(&uri, e)),
    }
}

/// An object store's completed write is durable; a local file is once it and its directory are
/// synced. Does nothing for object stores.
pub async fn sync_local(location: &Location) -> Result<(), StorageError> {
    if !location.is_local() {
        return Ok(());
    }
    let uri = location.uri();
    let path = std::path::PathBuf::from(&uri);
    tokio::task::spawn_blocking(move || sync_file(&path))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| StorageError::Io {
            uri,
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            },
        })
}

/// fsync of a file and of the directory that names it.
fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl AsyncFileWriter for PartUpload {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        async move {
            self.write_bytes(bs)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        async move {
            self.finish()
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::Stores;
    use crate::s3::S3Settings;

    #[tokio::test]
    async fn writes_once_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::new(S3Settings::default());
        let loc = stores
            .locate(&format!("{}/p/part.bin", dir.path().display()))
            .unwrap();
        let mut up = PartUpload::new(loc.clone());
        up.write(Bytes::from_static(b"hello ")).await.unwrap();
        up.write(Bytes::from_static(b"world")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(up.bytes_counter().load(Ordering::Relaxed), 11);
        assert_eq!(
            std::fs::read(dir.path().join("p/part.bin")).unwrap(),
            b"hello world"
        );
        let mut again = PartUpload::new(loc);
        again.write(Bytes::from_static(b"x")).await.unwrap();
        let e = again.complete().await.unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    /// A 24 MiB upload to `big.bin` in `dir`, streaming as a multipart upload, not completed.
    async fn multipart_in(dir: &std::path::Path) -> PartUpload {
        let stores = Stores::new(S3Settings::default());
        let loc = stores
            .locate(&format!("{}/big.bin", dir.display()))
            .unwrap();
        let mut up = PartUpload::new(loc);
        let block = Bytes::from(vec![7u8; 3 * 1024 * 1024]);
        for _ in 0..8 {
            up.write(block.clone()).await.unwrap();
        }
        assert!(up.upload.is_some(), "streams as a multipart upload");
        up
    }

    #[tokio::test]
    async fn large_objects_stream_as_multipart() {
        let dir = tempfile::tempdir().unwrap();
        multipart_in(dir.path()).await.complete().await.unwrap();
        let len = std::fs::metadata(dir.path().join("big.bin")).unwrap().len();
        assert_eq!(len, 24 * 1024 * 1024);
    }

    #[tokio::test]
    async fn a_multipart_upload_that_an_object_reached_meanwhile_is_refused_and_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let mut up = multipart_in(dir.path()).await;
        std::fs::write(dir.path().join("big.bin"), b"another's").unwrap();
        let e = up.complete().await.unwrap_err();
        let cause = crate::storage_cause(&e);
        assert!(
            matches!(cause, Some(StorageError::AlreadyExists { .. })),
            "{e}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("big.bin")).unwrap(),
            b"another's"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "the upload's staging file is gone: {names:?}"
        );
    }
}
