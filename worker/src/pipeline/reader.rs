//! Stage 1: read the shard's row groups with ranged GETs, decode the needed columns to Arrow,
//! and cut them into batches of exactly `batch.size` rows (the last may be short). Runs ahead
//! of the model by the channel's capacity, which is the prefetch.

use arrow_array::RecordBatch;
use futures::StreamExt;
use nightshift_proto::wire::ShardLease;
use nightshift_storage::{ObjectReader, ReadCounter, Stores};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::shard_error::ShardError;

/// Rows decoded at once (at least; never fewer than the model's batch).
const DECODE_BATCH_ROWS: usize = 8192;

/// A batch of input rows; `start` counts from the shard's first row.
pub struct InputBatch {
    pub start: u64,
    pub batch: RecordBatch,
}

/// The shard's file, opened and checked against the plan.
pub struct ShardInput {
    pub uri: String,
    pub reader: ObjectReader,
    pub metadata: ArrowReaderMetadata,
}

impl ShardInput {
    /// Reads the footer (one ranged GET) and checks the planned row groups still hold the
    /// planned rows.
    pub async fn open(
        stores: &Stores,
        lease: &ShardLease,
        counter: ReadCounter,
    ) -> Result<Self, ShardError> {
        let uri = lease.file.uri.clone();
        let loc = stores.locate(&uri)?;
        let mut reader =
            ObjectReader::new(loc, lease.file.size, lease.file.etag.clone()).with_counter(counter);
        let footer = reader
            .footer()
            .await
            .map_err(|e| ShardError::from_parquet(&uri, e))?;
        let metadata = ArrowReaderMetadata::try_new(footer.clone(), ArrowReaderOptions::new())
            .map_err(|e| ShardError::from_parquet(&uri, e))?;
        let plan = &lease.plan;
        let groups = footer.row_groups();
        if plan.row_group_end as usize > groups.len() {
            return Err(ShardError::Schema {
                uri,
                message: format!(
                    "the job planned row groups {}..{} but the file has {}",
                    plan.row_group_start,
                    plan.row_group_end,
                    groups.len()
                ),
            });
        }
        let rows: i64 = groups[plan.row_group_start as usize..plan.row_group_end as usize]
            .iter()
            .map(|g| g.num_rows())
            .sum();
        if rows as u64 != plan.rows {
            return Err(ShardError::Schema {
                uri,
                message: format!("row groups hold {rows} rows, the job planned {}", plan.rows),
            });
        }
        Ok(Self {
            uri,
            reader,
            metadata,
        })
    }

    pub fn schema(&self) -> &arrow_schema::SchemaRef {
        self.metadata.schema()
    }
}

/// Sends the shard's rows from `skip` on as batches of `batch_size`, until the end or until
/// `drain` is cancelled (then it stops before the next batch).
pub async fn read_batches(
    input: ShardInput,
    lease: &ShardLease,
    columns: &[String],
    batch_size: usize,
    skip: u64,
    tx: mpsc::Sender<Result<InputBatch, ShardError>>,
    drain: CancellationToken,
) {
    let uri = input.uri.clone();
    let result = async {
        let schema = input.metadata.schema().clone();
        let roots: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        let meta = input.metadata.metadata().clone();
        let descr = meta.file_metadata().schema_descr();
        // The column chunks each row group will be read for, so the next can be fetched while
        // the current one is decoded and inferred.
        let prefetch: Vec<Vec<std::ops::Range<u64>>> = (lease.plan.row_group_start
            ..lease.plan.row_group_end)
            .map(|rg| {
                let group = meta.row_group(rg as usize);
                (0..descr.num_columns())
                    .filter(|&leaf| roots.contains(&descr.get_column_root_idx(leaf)))
                    .map(|leaf| {
                        let (start, len) = group.column(leaf).byte_range();
                        start..start + len
                    })
                    .collect()
            })
            .collect();
        let mask = ProjectionMask::roots(descr, roots);
        let plan = &lease.plan;
        let selection = RowSelection::from(vec![
            RowSelector::skip(skip as usize),
            RowSelector::select((plan.rows - skip) as usize),
        ]);
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(
            input.reader.with_prefetch(prefetch),
            input.metadata,
        )
        .with_projection(mask)
        .with_row_groups((plan.row_group_start as usize..plan.row_group_end as usize).collect())
        .with_row_selection(selection)
        // Decoding in larger batches costs less per row; the rebatcher slices them (no copy) to
        // the model's batch size.
        .with_batch_size(batch_size.max(DECODE_BATCH_ROWS))
        .build()
        .map_err(|e| ShardError::from_parquet(&uri, e))?;
        let mut rebatch = Rebatcher::new(batch_size, skip);
        while let Some(next) = stream.next().await {
            let batch = next.map_err(|e| ShardError::from_parquet(&uri, e))?;
            for out in rebatch.push(batch)? {
                if drain.is_cancelled() {
                    return Ok(());
                }
                if tx.send(Ok(out)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(last) = rebatch.finish()?
            && !drain.is_cancelled()
        {
            let _ = tx.send(Ok(last)).await;
        }
        Ok::<(), ShardError>(())
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
}

/// Cuts a stream of batches of any size into batches of exactly `size` rows.
struct Rebatcher {
    size: usize,
    next_start: u64,
    held: Vec<RecordBatch>,
    held_rows: usize,
}

impl Rebatcher {
    fn new(size: usize, start: u64) -> Self {
        Self {
            size,
            next_start: start,
            held: Vec::new(),
            held_rows: 0,
        }
    }

    /// Cuts `batch` into batches of `size` rows without copying, except where a batch spans
    /// two inputs (then only that batch is copied).
    fn push(&mut self, mut batch: RecordBatch) -> Result<Vec<InputBatch>, ShardError> {
        let mut out = Vec::new();
        if self.held_rows > 0 {
            let take = (self.size - self.held_rows).min(batch.num_rows());
            self.held.push(batch.slice(0, take));
            self.held_rows += take;
            batch = batch.slice(take, batch.num_rows() - take);
            if self.held_rows == self.size {
                let whole = self.take_all()?;
                out.push(self.emit(whole));
            }
        }
        while batch.num_rows() >= self.size {
            let head = batch.slice(0, self.size);
            out.push(self.emit(head));
            batch = batch.slice(self.size, batch.num_rows() - self.size);
        }
        if batch.num_rows() > 0 {
            self.held_rows += batch.num_rows();
            self.held.push(batch);
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<Option<InputBatch>, ShardError> {
        if self.held_rows == 0 {
            return Ok(None);
        }
        let all = self.take_all()?;
        Ok(Some(self.emit(all)))
    }

    fn take_all(&mut self) -> Result<RecordBatch, ShardError> {
        let schema = self.held[0].schema();
        let all = if self.held.len() == 1 {
            self.held
                .pop()
                .unwrap_or_else(|| RecordBatch::new_empty(schema.clone()))
        } else {
            arrow::compute::concat_batches(&schema, &self.held)
                .map_err(|e| ShardError::Internal(e.to_string()))?
        };
        self.held.clear();
        self.held_rows = 0;
        Ok(all)
    }

    fn emit(&mut self, batch: RecordBatch) -> InputBatch {
        let start = self.next_start;
        self.next_start += batch.num_rows() as u64;
        InputBatch { start, batch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(from: i64, n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
        )
        .unwrap()
    }

    #[test]
    fn rebatches_to_exact_sizes_in_order() {
        let mut r = Rebatcher::new(4, 10);
        let mut out = Vec::new();
        for (from, n) in [(0, 3), (3, 4), (7, 1), (8, 9)] {
            out.extend(r.push(batch(from, n)).unwrap());
        }
        out.extend(r.finish().unwrap());
        let sizes: Vec<usize> = out.iter().map(|b| b.batch.num_rows()).collect();
        assert_eq!(sizes, [4, 4, 4, 4, 1]);
        let starts: Vec<u64> = out.iter().map(|b| b.start).collect();
        assert_eq!(starts, [10, 14, 18, 22, 26]);
        let ids: Vec<i64> = out
            .iter()
            .flat_map(|b| {
                b.batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(ids, (0..17).collect::<Vec<_>>());
    }
}
