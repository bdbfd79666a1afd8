//! Rows the store hands back.

use nightshift_proto::wire::{InputFile, JobView, LeaseSecret, PartRecord, ShardCounts, ShardPlan};

use crate::{LeaseHolder, StoreError};
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
    /// Rows per model call a worker last reported for this job.
    pub batch_rows: Option<u64>,
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
            model_held_by: Vec::new(),
            batch_rows: self.batch_rows,
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

/// Shard counts by state, rows checkpointed and poison rows of a job's row shards.
pub type ShardTally = (ShardCounts, u64, u64);

/// The columns of `shards` that `DialectRow::shard_row` reads.
pub const SHARD_COLUMNS: &str = "id, job_id, file_index, rows, state, token, attempts, \
     checkpoint_rows, error_rows, error";

/// The columns of `parts` that `DialectRow::part` reads, qualified by `p.`.
pub const PART_COLUMNS: &str = "p.shard_id, p.token, p.row_start, p.rows, p.bytes, p.uri, \
     p.error_rows, p.error_uri, p.error_bytes";

impl PartRow {
    /// The part as a worker reported it.
    pub fn record(&self) -> PartRecord {
        PartRecord {
            uri: self.uri.clone(),
            row_start: self.row_start,
            rows: self.rows,
            bytes: self.bytes,
            error_rows: self.error_rows,
            error_uri: self.error_uri.clone(),
            error_bytes: self.error_bytes,
        }
    }
}

/// A state column (job, shard or lease state).
pub fn parse_state<T: std::str::FromStr<Err = String>>(s: &str) -> crate::Result<T> {
    s.parse().map_err(StoreError::Corrupt)
}

/// A job's spec as the store keeps it (JSON).
pub fn parse_spec(json: &str) -> crate::Result<JobSpec> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))
}

/// A lease secret as the store keeps it (32 hex digits).
pub fn parse_secret(text: &str) -> crate::Result<LeaseSecret> {
    LeaseSecret::from_hex(text)
        .ok_or_else(|| crate::StoreError::Corrupt("a lease secret is not 32 hex digits".into()))
}

/// Reads `LeaseHolder`s and `OutputTaken` refusals from rows of either dialect: the columns
/// are the same, only the row type differs.
pub trait DialectRow<'r>: sqlx::Row
where
    &'static str: sqlx::ColumnIndex<Self>,
    i64: sqlx::Decode<'r, Self::Database> + sqlx::Type<Self::Database>,
    String: sqlx::Decode<'r, Self::Database> + sqlx::Type<Self::Database>,
{
    /// A row of the columns `JOB_COLUMNS` names.
    fn job(&'r self) -> crate::Result<JobRecord> {
        Ok(JobRecord {
            id: self.try_get("id")?,
            uid: self.try_get("uid")?,
            name: self.try_get("name")?,
            idempotency_key: self.try_get("idempotency_key")?,
            spec: parse_spec(&self.try_get::<String, _>("spec_json")?)?,
            spec_hash: self.try_get("spec_hash")?,
            state: parse_state(&self.try_get::<String, _>("state")?)?,
            priority: self.try_get::<i64, _>("priority")? as i32,
            rows_total: self.try_get::<i64, _>("rows_total")? as u64,
            output_uri: self.try_get("output_uri")?,
            error: self.try_get("error")?,
            created_at_ms: self.try_get("created_at_ms")?,
            started_at_ms: self.try_get("started_at_ms")?,
            finished_at_ms: self.try_get("finished_at_ms")?,
            batch_rows: self
                .try_get::<Option<i64>, _>("batch_rows")?
                .map(|n| n.max(0) as u64),
        })
    }

    /// A row of `id, done, bytes`, as the merge planner reads row shards.
    fn merge_candidate(&'r self) -> crate::Result<crate::merges::MergeCandidate>
    where
        bool: sqlx::Decode<'r, Self::Database> + sqlx::Type<Self::Database>,
    {
        Ok(crate::merges::MergeCandidate {
            shard_id: self.try_get("id")?,
            done: self.try_get("done")?,
            covered: false,
            bytes: self.try_get::<i64, _>("bytes")?.max(0) as u64,
        })
    }

    /// A row of `PART_COLUMNS`.
    fn part(&'r self) -> crate::Result<PartRow> {
        Ok(PartRow {
            shard_id: self.try_get("shard_id")?,
            token: self.try_get("token")?,
            row_start: self.try_get::<i64, _>("row_start")? as u64,
            rows: self.try_get::<i64, _>("rows")? as u64,
            bytes: self.try_get::<i64, _>("bytes")? as u64,
            uri: self.try_get("uri")?,
            error_rows: self.try_get::<i64, _>("error_rows")? as u64,
            error_uri: self.try_get("error_uri")?,
            error_bytes: self.try_get::<i64, _>("error_bytes")? as u64,
        })
    }

    /// A row of `id, token, worker_id, lease_secret, rows, uid, output_uri`.
    fn holder(&'r self) -> crate::Result<LeaseHolder> {
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

    /// A row of `uri, size, etag` (an input file as planned).
    fn input_file(&'r self) -> crate::Result<InputFile> {
        Ok(InputFile {
            uri: self.try_get("uri")?,
            size: self.try_get::<i64, _>("size")? as u64,
            etag: self.try_get("etag")?,
        })
    }

    /// A shard row's plan: `file_index, row_group_start, row_group_end, file_row_start, rows`.
    fn shard_plan(&'r self) -> crate::Result<ShardPlan> {
        Ok(ShardPlan {
            file_index: self.try_get::<i64, _>("file_index")? as u32,
            row_group_start: self.try_get::<i64, _>("row_group_start")? as u32,
            row_group_end: self.try_get::<i64, _>("row_group_end")? as u32,
            file_row_start: self.try_get::<i64, _>("file_row_start")? as u64,
            rows: self.try_get::<i64, _>("rows")? as u64,
        })
    }

    /// A row of `SHARD_COLUMNS`.
    fn shard_row(&'r self) -> crate::Result<ShardRow> {
        Ok(ShardRow {
            id: self.try_get("id")?,
            job_id: self.try_get("job_id")?,
            file_index: self.try_get::<i64, _>("file_index")? as u32,
            rows: self.try_get::<i64, _>("rows")? as u64,
            state: parse_state(&self.try_get::<String, _>("state")?)?,
            token: self.try_get("token")?,
            attempts: self.try_get::<i64, _>("attempts")? as u32,
            checkpoint_rows: self.try_get::<i64, _>("checkpoint_rows")? as u64,
            error_rows: self.try_get::<i64, _>("error_rows")? as u64,
            error: self.try_get("error")?,
        })
    }

    /// Adds a row of `state, n, done, errors` (a job's row shards grouped by state) to
    /// `tally`: the counts by state, the rows checkpointed and the poison rows.
    fn shard_tally(&'r self, tally: &mut ShardTally) -> crate::Result<()> {
        let n = self.try_get::<i64, _>("n")? as u64;
        tally.1 += self.try_get::<i64, _>("done")? as u64;
        tally.2 += self.try_get::<i64, _>("errors")? as u64;
        let counts = &mut tally.0;
        match parse_state::<ShardState>(&self.try_get::<String, _>("state")?)? {
            ShardState::Pending => counts.pending = n,
            ShardState::Leased => counts.leased = n,
            ShardState::Done => counts.done = n,
            ShardState::Dead => counts.dead = n,
        }
        Ok(())
    }

    /// A row of `id, name, output_uri` naming the job that owns an output `uri` overlaps.
    fn output_taken(&'r self, uri: &str) -> crate::Result<StoreError> {
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
