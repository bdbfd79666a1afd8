//! Rows the store hands back.

use nightshift_proto::wire::{JobView, LeaseSecret, ShardCounts};

use crate::store::{LeaseHolder, StoreError};
use nightshift_proto::{JobSpec, JobState, ShardState};

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: i64,
    pub uid: String,
    pub name: String,
    pub idempotency_key: Option<String>,
    pub spec: JobSpec,
    pub spec_hash: String,
    pub state: JobState,
    pub priority: i32,
    pub rows_total: u64,
    pub output_uri: String,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

impl JobRecord {
    /// The API view, given the shard counts, rows done and error rows, and the database clock.
    pub fn view(
        &self,
        counts: ShardCounts,
        rows_done: u64,
        error_rows: u64,
        now_ms: i64,
    ) -> JobView {
        let start = self.started_at_ms.unwrap_or(self.created_at_ms);
        let end = self.finished_at_ms.unwrap_or(now_ms);
        let secs = ((end - start).max(1)) as f64 / 1000.0;
        let rows_per_s = rows_done as f64 / secs;
        let left = self.rows_total.saturating_sub(rows_done);
        let eta_s =
            (!self.state.is_terminal() && rows_per_s > 0.0).then(|| left as f64 / rows_per_s);
        JobView {
            id: self.id,
            name: self.name.clone(),
            state: self.state,
            priority: self.priority,
            spec_hash: self.spec_hash.clone(),
            idempotency_key: self.idempotency_key.clone(),
            output_uri: self.output_uri.clone(),
            rows_total: self.rows_total,
            rows_done,
            error_rows,
            shards: counts,
            rows_per_s,
            eta_s,
            error: self.error.clone(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRow {
    pub id: i64,
    pub job_id: i64,
    pub file_index: u32,
    pub rows: u64,
    pub state: ShardState,
    pub token: i64,
    pub attempts: u32,
    pub checkpoint_rows: u64,
    pub error_rows: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRow {
    pub shard_id: i64,
    pub token: i64,
    pub row_start: u64,
    pub rows: u64,
    pub bytes: u64,
    pub uri: String,
    pub error_rows: u64,
    pub error_uri: Option<String>,
    pub error_bytes: u64,
}

/// A lease secret as the store keeps it (32 hex digits).
pub fn parse_secret(text: &str) -> crate::store::Result<LeaseSecret> {
    LeaseSecret::from_hex(text).ok_or_else(|| {
        crate::store::StoreError::Corrupt("a lease secret is not 32 hex digits".into())
    })
}

/// Reads `LeaseHolder`s and `OutputTaken` refusals from rows of either dialect: the columns
/// are the same, only the row type differs.
pub trait DialectRow<'r>: sqlx::Row
where
    &'static str: sqlx::ColumnIndex<Self>,
    i64: sqlx::Decode<'r, Self::Database> + sqlx::Type<Self::Database>,
    String: sqlx::Decode<'r, Self::Database> + sqlx::Type<Self::Database>,
{
    /// A row of `id, token, worker_id, lease_secret, rows, uid, output_uri`.
    fn holder(&'r self) -> crate::store::Result<LeaseHolder> {
        Ok(LeaseHolder {
            shard_id: self.try_get("id")?,
            token: self.try_get("token")?,
            worker: self
                .try_get::<Option<String>, _>("worker_id")?
                .unwrap_or_default(),
            secret: self
                .try_get::<Option<String>, _>("lease_secret")?
                .as_deref()
                .map(parse_secret)
                .transpose()?,
            rows: self.try_get::<i64, _>("rows")? as u64,
            job_uid: self.try_get("uid")?,
            output_uri: self.try_get("output_uri")?,
        })
    }

    /// A row of `id, name, output_uri` naming the job that owns an output `uri` overlaps.
    fn output_taken(&'r self, uri: &str) -> crate::store::Result<StoreError> {
        Ok(StoreError::OutputTaken {
            uri: uri.to_string(),
            job_id: self.try_get("id")?,
            job: self.try_get("name")?,
            owner_uri: self.try_get("output_uri")?,
        })
    }
}

impl<'r> DialectRow<'r> for sqlx::postgres::PgRow {}
impl<'r> DialectRow<'r> for sqlx::sqlite::SqliteRow {}

/// Gauges for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreMetrics {
    pub pending_shards: u64,
    pub pending_rows: u64,
    pub leased_shards: u64,
    pub running_jobs: u64,
    pub workers_seen: u64,
}

/// The message a job fails with when its poison rows pass the threshold, if they do.
pub fn error_threshold_exceeded(job: &JobRecord, error_rows: u64) -> Option<String> {
    let allowed = job.spec.errors.allowed_rows(job.rows_total);
    (error_rows > allowed).then(|| {
        format!(
            "{error_rows} poison rows (see _errors/ in the output) exceed the threshold of {allowed} \
             ([errors] max_rows = {}, max_fraction = {}, {} input rows)",
            job.spec
                .errors
                .max_rows
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unset".into()),
            job.spec
                .errors
                .max_fraction
                .map(|v| v.to_string())
                .unwrap_or_else(|| "unset".into()),
            job.rows_total
        )
    })
}

/// The message a job fails with when shards died.
pub fn dead_shards_message(dead: i64, first: i64, error: Option<&str>) -> String {
    format!(
        "{dead} shard(s) failed for good; shard {first}: {}",
        error.unwrap_or("no error recorded")
    )
}
