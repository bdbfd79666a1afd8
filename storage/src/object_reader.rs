//! Parquet's async reader over any object store: footers and row groups come in ranged GETs
//! (no input file is downloaded whole), each conditioned on the ETag seen at planning so a
//! changed object fails loudly instead of mixing versions.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use crate::error::StorageError;
use crate::location::Location;

/// Counts bytes fetched, so benchmarks can compare them with the bytes a job needed.
#[derive(Debug, Clone, Default)]
pub struct ReadCounter {
    bytes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl ReadCounter {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// Ranges closer than this are fetched in one request.
const COALESCE_BYTES: u64 = 1024 * 1024;
/// Bytes read from the end of a file in the first footer request.
const FOOTER_PREFETCH: usize = 64 * 1024;

/// A Parquet file in an object store, pinned to the size (and ETag) seen at planning.
pub struct ObjectReader {
    location: Location,
    size: u64,
    etag: Option<String>,
    counter: ReadCounter,
    metadata: Option<Arc<ParquetMetaData>>,
}

impl ObjectReader {
    pub fn new(location: Location, size: u64, etag: Option<String>) -> Self {
        Self {
            location,
            size,
            etag,
            counter: ReadCounter::default(),
            metadata: None,
        }
    }

    /// Counts every byte this reader fetches into `counter`.
    pub fn with_counter(mut self, counter: ReadCounter) -> Self {
        self.counter = counter;
        self
    }

    /// Reuses a footer already read.
    pub fn with_metadata(mut self, metadata: Arc<ParquetMetaData>) -> Self {
        self.metadata = Some(metadata);
        self
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Reads and parses the footer (usually one ranged GET).
    pub async fn footer(&mut self) -> Result<Arc<ParquetMetaData>, ParquetError> {
        if let Some(m) = &self.metadata {
            return Ok(m.clone());
        }
        let size = self.size;
        let meta = ParquetMetaDataReader::new()
            .with_prefetch_hint(Some(FOOTER_PREFETCH))
            .load_and_finish(&mut *self, size)
            .await?;
        let meta = Arc::new(meta);
        self.metadata = Some(meta.clone());
        Ok(meta)
    }

    fn fetch(&self, range: Range<u64>) -> BoxFuture<'static, Result<Bytes, ParquetError>> {
        let store = self.location.store().clone();
        let path = self.location.path().clone();
        let uri = self.location.uri();
        let counter = self.counter.clone();
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            if_match: self.etag.clone(),
            ..Default::default()
        };
        async move {
            let result = store
                .get_opts(&path, opts)
                .await
                .map_err(|e| to_parquet(&uri, e))?;
            let bytes = result.bytes().await.map_err(|e| to_parquet(&uri, e))?;
            counter.add(bytes.len() as u64);
            Ok(bytes)
        }
        .boxed()
    }
}

/// Wraps a storage error so callers can find it again with `storage_cause`.
fn to_parquet(uri: &str, e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(StorageError::from_store(uri, e)))
}

/// The storage error behind a Parquet error, if there is one.
pub fn storage_cause(e: &ParquetError) -> Option<&StorageError> {
    match e {
        ParquetError::External(inner) => inner.downcast_ref::<StorageError>(),
        _ => None,
    }
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        self.fetch(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            object_store::coalesce_ranges(&ranges, |r| self.fetch(r), COALESCE_BYTES).await
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move { self.footer().await }.boxed()
    }
}

/// Reads the whole of a small object (a model, a manifest).
pub async fn read_all(location: &Location) -> Result<Bytes, StorageError> {
    let uri = location.uri();
    let got = location
        .store()
        .get(location.path())
        .await
        .map_err(|e| StorageError::from_store(&uri, e))?;
    got.bytes()
        .await
        .map_err(|e| StorageError::from_store(&uri, e))
}
