//! Parquet's async reader over any object store: footers and row groups come in ranged GETs
//! (no input file is downloaded whole), each conditioned on the ETag seen at planning so a
//! changed object fails loudly instead of mixing versions.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, MetadataFetch};
use parquet::errors::ParquetError;
use parquet::file::FOOTER_SIZE;
use parquet::file::metadata::{FooterTail, ParquetMetaData, ParquetMetaDataReader};

use crate::error::StorageError;
use crate::location::Location;

/// Counts bytes fetched, so benchmarks can compare them with the bytes a job needed.
#[derive(Debug, Clone, Default)]
pub struct ReadCounter {
    bytes: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    prefetch_hits: Arc<AtomicU64>,
}

impl ReadCounter {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Ranges served from a row group fetched ahead of time.
    pub fn prefetch_hits(&self) -> u64 {
        self.prefetch_hits.load(Ordering::Relaxed)
    }
    fn hit(&self) {
        self.prefetch_hits.fetch_add(1, Ordering::Relaxed);
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
/// The largest Parquet footer read (its metadata, by the length the file's last bytes give).
/// A real one is kilobytes, megabytes for thousands of columns and row groups; a file that
/// claims more is refused before its footer is fetched, so that no file (a worker's part the
/// coordinator checks, an input) can make a reader hold gigabytes.
pub const MAX_FOOTER_BYTES: usize = 64 * 1024 * 1024;

/// A row group's bytes being fetched in the background.
type Prefetch = tokio::task::JoinHandle<Result<Vec<Bytes>, ParquetError>>;

/// A Parquet file in an object store, pinned to the size (and ETag) seen at planning.
pub struct ObjectReader {
    location: Location,
    size: u64,
    etag: Option<String>,
    counter: ReadCounter,
    metadata: Option<Arc<ParquetMetaData>>,
    /// Byte ranges of the row groups to be read, in reading order (see `with_prefetch`).
    plan: Vec<Vec<Range<u64>>>,
    /// The next planned row group, being fetched in the background.
    pending: Option<(Vec<Range<u64>>, Prefetch)>,
    /// Prefetched ranges not yet asked for.
    ready: HashMap<(u64, u64), Bytes>,
}

impl ObjectReader {
    pub fn new(location: Location, size: u64, etag: Option<String>) -> Self {
        Self {
            location,
            size,
            etag,
            counter: ReadCounter::default(),
            metadata: None,
            plan: Vec::new(),
            pending: None,
            ready: HashMap::new(),
        }
    }

    /// Prefetching: `plan` holds, for each row group to be read and in reading order, the
    /// byte ranges of its column chunks. When the reader asks for one of them, the next is
    /// fetched in the background, so its bytes are there by the time the current row group has
    /// been decoded and inferred.
    pub fn with_prefetch(mut self, plan: Vec<Vec<Range<u64>>>) -> Self {
        self.plan = plan;
        self
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

    /// Reads and parses the footer (usually one ranged GET); one longer than
    /// `MAX_FOOTER_BYTES` is refused.
    pub async fn footer(&mut self) -> Result<Arc<ParquetMetaData>, ParquetError> {
        self.footer_within(MAX_FOOTER_BYTES).await
    }

    async fn footer_within(&mut self, max: usize) -> Result<Arc<ParquetMetaData>, ParquetError> {
        if let Some(m) = &self.metadata {
            return Ok(m.clone());
        }
        let size = self.size;
        let fetch = CappedFooter {
            reader: self,
            size,
            max,
        };
        let meta = ParquetMetaDataReader::new()
            .with_prefetch_hint(Some(FOOTER_PREFETCH))
            .load_and_finish(fetch, size)
            .await?;
        let meta = Arc::new(meta);
        self.metadata = Some(meta.clone());
        Ok(meta)
    }

    /// Fetches several ranges (close ones in one request), in the background-friendly form.
    fn fetch_ranges(
        &self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'static, Result<Vec<Bytes>, ParquetError>> {
        let fetcher = self.fetcher();
        async move { object_store::coalesce_ranges(&ranges, &fetcher, COALESCE_BYTES).await }
            .boxed()
    }

    fn fetcher(
        &self,
    ) -> impl Fn(Range<u64>) -> BoxFuture<'static, Result<Bytes, ParquetError>> + Send + 'static
    {
        let store = self.location.store().clone();
        let path = self.location.path().clone();
        let uri = self.location.uri();
        let counter = self.counter.clone();
        let etag = self.etag.clone();
        move |range| {
            let (store, path, uri, counter) =
                (store.clone(), path.clone(), uri.clone(), counter.clone());
            let opts = GetOptions {
                range: Some(GetRange::Bounded(range)),
                if_match: etag.clone(),
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

    /// Serves `ranges`, from the prefetched row group where it has them, and starts the next.
    async fn ranges_prefetching(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> Result<Vec<Bytes>, ParquetError> {
        if let Some((planned, handle)) = self.pending.take() {
            let wanted = ranges.iter().any(|r| planned.contains(r));
            if wanted {
                // A failed prefetch is not an error yet: the ranges are fetched again below.
                if let Ok(Ok(data)) = handle.await {
                    for (r, b) in planned.iter().zip(data) {
                        self.ready.insert((r.start, r.end), b);
                    }
                }
            } else {
                self.pending = Some((planned, handle));
            }
        }
        let missing: Vec<Range<u64>> = ranges
            .iter()
            .filter(|r| !self.ready.contains_key(&(r.start, r.end)))
            .cloned()
            .collect();
        let mut fetched = if missing.is_empty() {
            Vec::new()
        } else {
            self.fetch_ranges(missing.clone()).await?
        }
        .into_iter();
        let mut out = Vec::with_capacity(ranges.len());
        for r in &ranges {
            match self.ready.remove(&(r.start, r.end)) {
                Some(b) => {
                    self.counter.hit();
                    out.push(b)
                }
                None => out.push(
                    fetched
                        .next()
                        .ok_or_else(|| ParquetError::General("short fetch".into()))?,
                ),
            }
        }
        if self.pending.is_none()
            && let Some(i) = self
                .plan
                .iter()
                .position(|p| ranges.iter().any(|r| p.contains(r)))
            && let Some(next) = self.plan.get(i + 1).cloned()
        {
            let fetch = self.fetch_ranges(next.clone());
            self.pending = Some((next, tokio::spawn(fetch)));
        }
        Ok(out)
    }
}

/// Fetches a footer for `ParquetMetaDataReader`, refusing one longer than `max` as soon as the
/// file's tail (the first fetch, which ends at the file's end) gives its length.
struct CappedFooter<'a> {
    reader: &'a mut ObjectReader,
    size: u64,
    max: usize,
}

impl MetadataFetch for CappedFooter<'_> {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let (size, max, ends) = (self.size, self.max, range.end == self.size);
        let get = self.reader.get_bytes(range);
        async move {
            let bytes = get.await?;
            if let Some(tail) = bytes.len().checked_sub(FOOTER_SIZE).filter(|_| ends) {
                let len = FooterTail::try_from(&bytes[tail..])?.metadata_length();
                if len > max {
                    return Err(ParquetError::General(format!(
                        "its footer is {len} bytes long, more than the {max} bytes a footer \
                         may be (file of {size} bytes)"
                    )));
                }
            }
            Ok(bytes)
        }
        .boxed()
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.pending.take() {
            handle.abort();
        }
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
        (self.fetcher())(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            if self.plan.is_empty() {
                self.fetch_ranges(ranges).await
            } else {
                self.ranges_prefetching(ranges).await
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::location::Stores;
    use crate::s3::S3Settings;
    use arrow_array::{Float64Array, Int64Array, RecordBatch};
    use futures::TryStreamExt;
    use parquet::arrow::arrow_reader::ArrowReaderMetadata;
    use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
    use parquet::arrow::{ArrowWriter, ProjectionMask};
    use parquet::file::properties::WriterProperties;

    /// 8 row groups of 1000 rows: `id` and `x`.
    fn write_file(path: &std::path::Path) {
        let ids = Int64Array::from_iter_values(0..8000);
        let xs = Float64Array::from_iter_values((0..8000).map(|i| i as f64 * 0.5));
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as arrow_array::ArrayRef),
            ("x", Arc::new(xs) as arrow_array::ArrayRef),
        ])
        .unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(1000))
            .build();
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[tokio::test]
    async fn prefetches_the_next_row_group_and_reads_each_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_file(&path);
        let size = std::fs::metadata(&path).unwrap().len();
        let stores = Stores::new(S3Settings::default());
        let counter = ReadCounter::default();
        let mut reader =
            ObjectReader::new(stores.locate(path.to_str().unwrap()).unwrap(), size, None)
                .with_counter(counter.clone());
        let footer = reader.footer().await.unwrap();
        let footer_bytes = counter.bytes();
        let groups = 2..7usize;
        // Only column `x` (leaf 1).
        let plan: Vec<Vec<Range<u64>>> = groups
            .clone()
            .map(|g| {
                let (s, l) = footer.row_group(g).column(1).byte_range();
                std::iter::once(s..s + l).collect()
            })
            .collect();
        let needed: u64 = plan.iter().flatten().map(|r| r.end - r.start).sum();
        let meta = ArrowReaderMetadata::try_new(footer.clone(), Default::default()).unwrap();
        let mask = ProjectionMask::roots(footer.file_metadata().schema_descr(), [1]);
        let batches: Vec<RecordBatch> =
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader.with_prefetch(plan), meta)
                .with_projection(mask)
                .with_row_groups(groups.collect())
                .build()
                .unwrap()
                .try_collect()
                .await
                .unwrap();
        let xs: Vec<f64> = batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(xs.len(), 5000);
        assert_eq!(xs[0], 1000.0);
        assert_eq!(
            counter.prefetch_hits(),
            4,
            "row groups 3..7 came from the prefetch"
        );
        assert_eq!(
            counter.bytes() - footer_bytes,
            needed,
            "every needed byte read once"
        );
    }

    fn reader_of(path: &std::path::Path) -> ObjectReader {
        let size = std::fs::metadata(path).unwrap().len();
        let stores = Stores::new(S3Settings::default());
        ObjectReader::new(stores.locate(path.to_str().unwrap()).unwrap(), size, None)
    }

    #[tokio::test]
    async fn a_footer_longer_than_the_cap_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        write_file(&path);
        let footer = reader_of(&path).footer_within(1 << 20).await.unwrap();
        assert_eq!(footer.file_metadata().num_rows(), 8000);
        let err = reader_of(&path).footer_within(100).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("more than the 100 bytes a footer may be"),
            "{err}"
        );

        // A file whose last bytes claim a 4 GiB footer: refused at the cap, nothing more read.
        let fake = dir.path().join("fake.parquet");
        let mut bytes = b"PAR1".to_vec();
        bytes.extend([0u8; 64]);
        bytes.extend(u32::MAX.to_le_bytes());
        bytes.extend(b"PAR1");
        std::fs::write(&fake, &bytes).unwrap();
        let counter = ReadCounter::default();
        let err = reader_of(&fake)
            .with_counter(counter.clone())
            .footer()
            .await
            .unwrap_err();
        let said = format!(
            "its footer is {} bytes long, more than the {MAX_FOOTER_BYTES}",
            u32::MAX
        );
        assert!(err.to_string().contains(&said), "{err}");
        assert_eq!(counter.requests(), 1, "only the file's tail was read");
    }
}
