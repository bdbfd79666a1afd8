//! Stage 4: output batches (passthrough columns + predictions) and poison rows are encoded as
//! Parquet and streamed to part objects under `OUTPUT/_parts/<job>/`, one part per checkpoint
//! interval. A part is handed back for its checkpoint only after its upload completed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{ArrayRef, StringArray, UInt32Array, UInt64Array};
use arrow::compute::take;
use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use nightshift_proto::layout::{JOB_UID_KEY, part_name};
use nightshift_proto::wire::{PartRecord, ShardLease, TokenCounts};
use nightshift_signature::TensorPlan;
use nightshift_storage::{Location, PartUpload};
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::pipeline::infer::Inferred;
use crate::shard_error::ShardError;
use crate::text::TokenStats;

/// Columns every error row carries after its passthrough columns.
pub const ERROR_ROW: &str = "_row";
pub const ERROR_CLASS: &str = "_error_class";
pub const ERROR_MESSAGE: &str = "_error";

/// The schema of `_errors/` files: passthrough columns, the row's index in its input file, the
/// error class and the message.
pub fn error_schema(plan: &TensorPlan, passthrough: usize) -> SchemaRef {
    let mut fields: Vec<Field> = plan.output_schema.fields()[..passthrough]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("_input_file", DataType::Utf8, false));
    fields.push(Field::new(ERROR_ROW, DataType::UInt64, false));
    fields.push(Field::new(ERROR_CLASS, DataType::Utf8, false));
    fields.push(Field::new(ERROR_MESSAGE, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// Parts are written once and read once or twice: no dictionaries (predictions and ids do not
/// repeat, and building one costs more than it saves) and column-chunk statistics only. The
/// footer names the job, so that its commit recognises the file as its own.
pub fn writer_properties(job_uid: &str) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(parquet::file::properties::EnabledStatistics::Chunk)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            JOB_UID_KEY.to_string(),
            job_uid.to_string(),
        )]))
        .build()
}

struct OpenFile {
    writer: AsyncArrowWriter<PartUpload>,
    bytes: Arc<AtomicU64>,
    location: Location,
}

impl OpenFile {
    fn create(
        location: Location,
        schema: SchemaRef,
        props: WriterProperties,
    ) -> Result<Self, ShardError> {
        let upload = PartUpload::new(location.clone());
        let bytes = upload.bytes_counter();
        let writer = AsyncArrowWriter::try_new(upload, schema, Some(props))
            .map_err(|e| write_err(&location, e))?;
        Ok(Self {
            writer,
            bytes,
            location,
        })
    }

    async fn write(&mut self, batch: &RecordBatch) -> Result<(), ShardError> {
        self.writer
            .write(batch)
            .await
            .map_err(|e| write_err(&self.location, e))
    }

    /// Finishes the upload; returns the object's size.
    async fn close(self) -> Result<(Location, u64), ShardError> {
        let loc = self.location.clone();
        self.writer.close().await.map_err(|e| write_err(&loc, e))?;
        Ok((loc, self.bytes.load(Ordering::Relaxed)))
    }

    async fn abort(self) {
        let mut upload = self.writer.into_inner();
        upload.abort().await;
    }
}

fn write_err(loc: &Location, e: impl std::fmt::Display) -> ShardError {
    ShardError::Write {
        uri: loc.uri(),
        message: e.to_string(),
    }
}

struct OpenPart {
    row_start: u64,
    rows: u64,
    error_rows: u64,
    /// A text job's tokens over the part's rows.
    tokens: TokenStats,
    out: OpenFile,
    errors: Option<OpenFile>,
}

/// Writes one shard's parts.
pub struct PartSink {
    prefix: Location,
    shard_id: i64,
    token: i64,
    input_uri: String,
    file_row_start: u64,
    plan: Arc<TensorPlan>,
    passthrough: Vec<String>,
    error_schema: SchemaRef,
    props: WriterProperties,
    checkpoint_rows: u64,
    open: Option<OpenPart>,
}

impl PartSink {
    /// Parts of `lease`, written under `prefix` (the job's parts directory).
    pub fn new(
        prefix: Location,
        lease: &ShardLease,
        plan: Arc<TensorPlan>,
        passthrough: Vec<String>,
        checkpoint_rows: u64,
    ) -> Self {
        let error_schema = error_schema(&plan, passthrough.len());
        Self {
            prefix,
            shard_id: lease.shard_id,
            token: lease.token,
            input_uri: lease.file.uri.clone(),
            file_row_start: lease.plan.file_row_start,
            plan,
            passthrough,
            error_schema,
            props: writer_properties(&lease.job_uid),
            checkpoint_rows,
            open: None,
        }
    }

    /// Adds a batch; returns the part it completed, if it completed one.
    pub async fn write(&mut self, inf: Inferred) -> Result<Option<PartRecord>, ShardError> {
        if self.open.is_none() {
            let name = part_name(self.shard_id, self.token, inf.start, false);
            self.open = Some(OpenPart {
                row_start: inf.start,
                rows: 0,
                error_rows: 0,
                tokens: TokenStats::default(),
                out: OpenFile::create(
                    self.prefix.join(&name),
                    self.plan.output_schema.clone(),
                    self.props.clone(),
                )?,
                errors: None,
            });
        }
        let out_batch = self.output_batch(&inf)?;
        let err_batch = (!inf.errors.is_empty())
            .then(|| self.error_batch(&inf))
            .transpose()?;
        let Some(part) = self.open.as_mut() else {
            return Err(ShardError::Internal("no open part".into()));
        };
        part.out.write(&out_batch).await?;
        if let Some(eb) = err_batch {
            if part.errors.is_none() {
                let name = part_name(self.shard_id, self.token, part.row_start, true);
                part.errors = Some(OpenFile::create(
                    self.prefix.join(&name),
                    self.error_schema.clone(),
                    self.props.clone(),
                )?);
            }
            if let Some(e) = part.errors.as_mut() {
                e.write(&eb).await?;
            }
            part.error_rows += eb.num_rows() as u64;
        }
        part.rows += inf.input.num_rows() as u64;
        part.tokens.add(inf.tokens);
        if part.rows >= self.checkpoint_rows {
            return self.finish().await;
        }
        Ok(None)
    }

    /// Closes the open part, if any, and returns its record.
    pub async fn finish(&mut self) -> Result<Option<PartRecord>, ShardError> {
        let Some(part) = self.open.take() else {
            return Ok(None);
        };
        let (error_uri, error_bytes) = match part.errors {
            Some(e) => {
                let (loc, bytes) = e.close().await?;
                (Some(loc.uri()), bytes)
            }
            None => (None, 0),
        };
        let (loc, bytes) = part.out.close().await?;
        Ok(Some(PartRecord {
            uri: loc.uri(),
            row_start: part.row_start,
            rows: part.rows,
            bytes,
            error_rows: part.error_rows,
            error_uri,
            error_bytes,
            tokens: self.plan.text.is_some().then_some(TokenCounts {
                real: part.tokens.real_tokens,
                padded: part.tokens.padded_tokens,
                truncated_rows: part.tokens.truncated_rows,
            }),
        }))
    }

    /// Abandons the open part (lease lost, or a failure): its uploads are aborted.
    pub async fn abort(&mut self) {
        if let Some(part) = self.open.take() {
            part.out.abort().await;
            if let Some(e) = part.errors {
                e.abort().await;
            }
        }
    }

    fn output_batch(&self, inf: &Inferred) -> Result<RecordBatch, ShardError> {
        let internal = |e: arrow_schema::ArrowError| ShardError::Internal(e.to_string());
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.plan.output_schema.fields().len());
        for name in &self.passthrough {
            let col = inf
                .input
                .column_by_name(name)
                .ok_or_else(|| ShardError::Internal(format!("passthrough `{name}` not read")))?;
            cols.push(match &inf.kept {
                None => col.clone(),
                Some(rows) => {
                    take(col, &UInt32Array::from(rows.clone()), None).map_err(internal)?
                }
            });
        }
        cols.extend(inf.outputs.iter().cloned());
        RecordBatch::try_new(self.plan.output_schema.clone(), cols).map_err(internal)
    }

    fn error_batch(&self, inf: &Inferred) -> Result<RecordBatch, ShardError> {
        let internal = |e: arrow_schema::ArrowError| ShardError::Internal(e.to_string());
        let rows = UInt32Array::from(inf.errors.iter().map(|e| e.row as u32).collect::<Vec<_>>());
        let mut cols: Vec<ArrayRef> = Vec::new();
        for name in &self.passthrough {
            let col = inf
                .input
                .column_by_name(name)
                .ok_or_else(|| ShardError::Internal(format!("passthrough `{name}` not read")))?;
            cols.push(take(col, &rows, None).map_err(internal)?);
        }
        let n = inf.errors.len();
        cols.push(Arc::new(StringArray::from(vec![
            self.input_uri.as_str();
            n
        ])));
        cols.push(Arc::new(UInt64Array::from_iter_values(
            inf.errors
                .iter()
                .map(|e| self.file_row_start + inf.start + e.row as u64),
        )));
        cols.push(Arc::new(StringArray::from_iter_values(
            inf.errors.iter().map(|e| e.class),
        )));
        cols.push(Arc::new(StringArray::from_iter_values(
            inf.errors.iter().map(|e| e.message.as_str()),
        )));
        RecordBatch::try_new(self.error_schema.clone(), cols).map_err(internal)
    }
}
