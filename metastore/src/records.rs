//! The rows the metastore reads, as `sqlx::FromRow` models, and the records it hands back.
//! Counts are BIGINT in both dialects and never negative: they decode through `try_from`, so
//! a negative one is an error, not a wrapped number.

use nightshift_proto::wire::{
    InputFile, LeaseGrant, LeaseSecret, MergeFiles, PartRecord, ShardCounts, ShardLease, ShardPlan,
    TokenCounts,
};
use nightshift_proto::{CatchUp, JobSpec, JobState, ShardState};

use crate::{LeaseHolder, StoreError};

/// The columns `JobRecord` reads.
pub(crate) const JOB_COLUMNS: &str = "id, uid, name, idempotency_key, spec_json, spec_hash, \
     state, priority, rows_total, output_uri, error, created_at_ms, started_at_ms, \
     finished_at_ms, batch_rows, planning, files_planned, files_listed, output_schema, \
     files_removed_at_ms";

/// The columns of `shards` that `ShardRow` reads.
pub(crate) const SHARD_COLUMNS: &str = "id, job_id, file_index, rows, state, token, attempts, \
     checkpoint_rows, error_rows, error, worker_id";

/// The columns of `parts` that `PartRow` reads, qualified by `p.`.
pub(crate) const PART_COLUMNS: &str = "p.shard_id, p.token, p.row_start, p.rows, p.bytes, \
     p.uri, p.error_rows, p.error_uri, p.error_bytes, p.real_tokens, p.padded_tokens, \
     p.truncated_rows";

/// The columns `Granted` reads, over a claimed shard `s`, its job `j` and its file `f`.
pub(crate) const GRANTED_COLUMNS: &str = "s.id, s.job_id, s.file_index, s.row_group_start, \
     s.row_group_end, s.file_row_start, s.rows, s.token, s.attempts, s.checkpoint_rows, \
     s.lease_secret, s.kind, s.merge_first, s.merge_last, s.output_file, s.error_file, j.uid, \
     j.spec_json, j.spec_hash, f.uri, f.size, f.etag";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobRecord {
    pub id: i64,
    pub uid: String,
    pub name: String,
    pub idempotency_key: Option<String>,
    #[sqlx(rename = "spec_json", try_from = "String")]
    pub spec: JobSpec,
    pub spec_hash: String,
    #[sqlx(try_from = "String")]
    pub state: JobState,
    #[sqlx(try_from = "i64")]
    pub priority: i32,
    #[sqlx(try_from = "i64")]
    pub rows_total: u64,
    pub output_uri: String,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Rows per model call a worker last reported for this job (never negative).
    pub batch_rows: Option<i64>,
    /// Its shards are still being cut in the background (`append_plan`).
    pub planning: bool,
    /// Its output schema as the manifest lists it (JSON), once a file merge work wrote in
    /// place is checkpointed (`note_output_schema`).
    pub output_schema: Option<String>,
    /// Input files recorded so far.
    #[sqlx(try_from = "i64")]
    pub files_planned: u64,
    /// Input files the background listing found, once it is done.
    pub files_listed: Option<i64>,
    /// When its files were removed (it was cancelled, and a later job took its output).
    pub files_removed_at_ms: Option<i64>,
}

impl JobRecord {
    /// The state a user sees: a running job whose shards are still being cut reads `planning`.
    pub fn shown_state(&self) -> JobState {
        match self.state {
            JobState::Running if self.planning => JobState::Planning,
            state => state,
        }
    }
}

/// The stored state and planning flag of jobs shown in `shown` (`JobRecord::shown_state`):
/// what a filter by the state a user sees compares.
pub(crate) fn stored_state(shown: JobState) -> (JobState, Option<bool>) {
    match shown {
        JobState::Planning => (JobState::Running, Some(true)),
        JobState::Running => (JobState::Running, Some(false)),
        state => (state, None),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ShardRow {
    pub id: i64,
    pub job_id: i64,
    #[sqlx(try_from = "i64")]
    pub file_index: u32,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
    #[sqlx(try_from = "String")]
    pub state: ShardState,
    pub token: i64,
    #[sqlx(try_from = "i64")]
    pub attempts: u32,
    #[sqlx(try_from = "i64")]
    pub checkpoint_rows: u64,
    #[sqlx(try_from = "i64")]
    pub error_rows: u64,
    pub error: Option<String>,
    /// Who holds or last held its lease.
    pub worker_id: Option<String>,
}

/// Rows a job committed in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RowsAt {
    /// The bucket's start, milliseconds since the epoch.
    pub at_ms: i64,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
}

/// A worker the metastore saw lately: by its last claim, or by a lease it holds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkerSeen {
    pub id: String,
    pub last_seen_ms: i64,
    /// Rows committed within the window by shards it holds or last held.
    #[sqlx(try_from = "i64")]
    pub rows_recent: u64,
    /// The machine it runs on, as its last claim said (all three or none).
    pub instance_id: Option<String>,
    pub instance_type: Option<String>,
    pub capacity_type: Option<String>,
    /// Shards it runs at once, as its last claim said (none before it said).
    pub slots: Option<i64>,
    /// Asked to drain.
    pub draining: bool,
    /// Told to drain by a coordinator's answer.
    pub drain_told: bool,
}

/// What a worker says about itself with its claims: the machine it runs on (when it knows),
/// its slots and the GPUs they use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerMachine {
    pub instance: Option<nightshift_proto::InstanceInfo>,
    pub slots: u32,
    pub gpus: u32,
}

/// A job's lease time on one kind of machine: ended leases (`lease_usage`) and the ones held
/// now, summed.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageSum {
    pub instance_type: Option<String>,
    pub capacity_type: Option<String>,
    pub slots: i64,
    pub gpus: i64,
    /// Milliseconds leases were held.
    pub held_ms: i64,
    /// Milliseconds whose work was not kept (since the last checkpoint of a lease that did not
    /// complete).
    pub lost_ms: i64,
}

/// A shard leased now, and to whom.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LeasedShard {
    pub worker_id: String,
    pub job_id: i64,
    pub shard_id: i64,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
    #[sqlx(try_from = "i64")]
    pub checkpoint_rows: u64,
    /// When the lease expires unless renewed: a worker's heartbeats move it on, so it tells
    /// when the worker was last heard from.
    pub lease_expires_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PartRow {
    pub shard_id: i64,
    pub token: i64,
    #[sqlx(try_from = "i64")]
    pub row_start: u64,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
    #[sqlx(try_from = "i64")]
    pub bytes: u64,
    pub uri: String,
    #[sqlx(try_from = "i64")]
    pub error_rows: u64,
    pub error_uri: Option<String>,
    #[sqlx(try_from = "i64")]
    pub error_bytes: u64,
    #[sqlx(try_from = "i64")]
    pub real_tokens: u64,
    #[sqlx(try_from = "i64")]
    pub padded_tokens: u64,
    #[sqlx(try_from = "i64")]
    pub truncated_rows: u64,
}

/// A text job's tokens over its parts.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenSums {
    #[sqlx(try_from = "i64")]
    pub real: u64,
    #[sqlx(try_from = "i64")]
    pub padded: u64,
    #[sqlx(try_from = "i64")]
    pub truncated_rows: u64,
}

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
            tokens: (self.padded_tokens > 0).then_some(TokenCounts {
                real: self.real_tokens,
                padded: self.padded_tokens,
                truncated_rows: self.truncated_rows,
            }),
        }
    }
}

/// An input file as planned.
#[derive(sqlx::FromRow)]
pub(crate) struct FileRow {
    uri: String,
    #[sqlx(try_from = "i64")]
    size: u64,
    etag: Option<String>,
}

impl From<FileRow> for InputFile {
    fn from(f: FileRow) -> Self {
        InputFile {
            uri: f.uri,
            size: f.size,
            etag: f.etag,
        }
    }
}

/// A job's row shards in one state: how many, rows checkpointed and poison rows.
#[derive(sqlx::FromRow)]
pub(crate) struct StateTally {
    #[sqlx(try_from = "String")]
    state: ShardState,
    /// Row shards, or speculative copies of them.
    copies: bool,
    #[sqlx(try_from = "i64")]
    n: u64,
    #[sqlx(try_from = "i64")]
    done: u64,
    #[sqlx(try_from = "i64")]
    errors: u64,
}

/// Shard counts by state, rows checkpointed and poison rows of a job's row shards.
pub type ShardTally = (ShardCounts, u64, u64);

/// Sums a job's row shards by state into a tally.
pub(crate) fn tally(rows: Vec<StateTally>) -> ShardTally {
    let mut tally = ShardTally::default();
    for row in rows {
        if row.copies {
            // A copy's rows are its original's: only the copies running are counted.
            if row.state == ShardState::Leased {
                tally.0.copies += row.n;
            }
            continue;
        }
        tally.1 += row.done;
        tally.2 += row.errors;
        let counts = &mut tally.0;
        *match row.state {
            ShardState::Pending => &mut counts.pending,
            ShardState::Leased => &mut counts.leased,
            ShardState::Done => &mut counts.done,
            ShardState::Dead => &mut counts.dead,
        } = row.n;
    }
    tally
}

/// A leased shard with its job and file: what the lease check reads, or a refused write.
#[derive(sqlx::FromRow)]
pub(crate) struct HolderRow {
    id: i64,
    token: i64,
    worker_id: Option<String>,
    lease_secret: Option<String>,
    #[sqlx(try_from = "i64")]
    rows: u64,
    uid: String,
    output_uri: String,
    #[sqlx(flatten)]
    merge_files: MergeFileRow,
}

impl TryFrom<HolderRow> for LeaseHolder {
    type Error = StoreError;

    fn try_from(r: HolderRow) -> Result<Self, StoreError> {
        Ok(LeaseHolder {
            shard_id: r.id,
            token: r.token,
            worker: r.worker_id.unwrap_or_default(),
            secret: r.lease_secret.as_deref().map(parse_secret).transpose()?,
            rows: r.rows,
            job_uid: r.uid,
            output_uri: r.output_uri,
            merge_files: r.merge_files.files()?,
        })
    }
}

/// A shard as a refused lease write finds it (`rules::refusal` says why it was refused).
#[derive(sqlx::FromRow)]
pub(crate) struct LeaseRow {
    #[sqlx(try_from = "String")]
    pub state: ShardState,
    pub token: i64,
    #[sqlx(try_from = "i64")]
    pub checkpoint_rows: u64,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
    pub job_id: i64,
    #[sqlx(try_from = "String")]
    pub job_state: JobState,
}

/// A shard just granted, with its job and input file, in `GRANTED_COLUMNS`.
#[derive(sqlx::FromRow)]
pub(crate) struct Granted {
    pub id: i64,
    pub job_id: i64,
    #[sqlx(flatten)]
    pub plan: PlanRow,
    pub token: i64,
    #[sqlx(try_from = "i64")]
    pub attempts: u32,
    #[sqlx(try_from = "i64")]
    pub checkpoint_rows: u64,
    pub lease_secret: String,
    pub kind: String,
    pub merge_first: Option<i64>,
    pub merge_last: Option<i64>,
    #[sqlx(flatten)]
    pub merge_files: MergeFileRow,
    pub uid: String,
    pub spec_json: String,
    pub spec_hash: String,
    #[sqlx(flatten)]
    pub file: FileRow,
}

/// The output names of a merge shard's files (`output_file`, `error_file`).
#[derive(sqlx::FromRow)]
pub(crate) struct MergeFileRow {
    output_file: Option<i64>,
    error_file: Option<i64>,
}

impl MergeFileRow {
    /// `None` when neither file is named (not merge work, or merge work made before numbering).
    pub fn files(&self) -> crate::Result<Option<MergeFiles>> {
        let index = |i: Option<i64>| {
            i.map(u32::try_from)
                .transpose()
                .map_err(|_| StoreError::Corrupt("a merge file index is out of range".into()))
        };
        let files = MergeFiles {
            output: index(self.output_file)?,
            errors: index(self.error_file)?,
        };
        Ok((files != MergeFiles::default()).then_some(files))
    }
}

/// A shard's plan columns.
#[derive(sqlx::FromRow)]
pub(crate) struct PlanRow {
    #[sqlx(try_from = "i64")]
    file_index: u32,
    #[sqlx(try_from = "i64")]
    row_group_start: u32,
    #[sqlx(try_from = "i64")]
    row_group_end: u32,
    #[sqlx(try_from = "i64")]
    file_row_start: u64,
    #[sqlx(try_from = "i64")]
    rows: u64,
}

impl Granted {
    /// The lease to hand out, given the job's spec and, for merge work, the parts it merges.
    pub fn lease(self, spec: JobSpec, merge: Option<Vec<PartRecord>>) -> crate::Result<ShardLease> {
        let p = self.plan;
        let grant = LeaseGrant {
            job_id: self.job_id,
            job_uid: self.uid,
            shard_id: self.id,
            token: self.token,
            secret: parse_secret(&self.lease_secret)?,
            attempt: self.attempts,
            file: self.file.into(),
            plan: ShardPlan {
                file_index: p.file_index,
                row_group_start: p.row_group_start,
                row_group_end: p.row_group_end,
                file_row_start: p.file_row_start,
                rows: p.rows,
            },
            checkpoint_rows: self.checkpoint_rows,
            spec_hash: self.spec_hash,
            merge_files: merge.as_ref().and(self.merge_files.files()?),
            merge,
        };
        Ok(ShardLease { grant, spec })
    }

    /// The row shards it merges, if it is merge work.
    pub fn merge_range(&self) -> crate::Result<Option<(i64, i64)>> {
        if self.kind != crate::rules::ShardKind::Merge.as_str() {
            return Ok(None);
        }
        match (self.merge_first, self.merge_last) {
            (Some(first), Some(last)) => Ok(Some((first, last))),
            _ => Err(StoreError::Corrupt(format!(
                "merge shard {} has no range",
                self.id
            ))),
        }
    }
}

/// A job's spec as the store keeps it (JSON).
pub(crate) fn parse_spec(json: &str) -> crate::Result<JobSpec> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))
}

/// A lease secret as the store keeps it (32 hex digits).
fn parse_secret(text: &str) -> crate::Result<LeaseSecret> {
    LeaseSecret::from_hex(text)
        .ok_or_else(|| StoreError::Corrupt("a lease secret is not 32 hex digits".into()))
}

/// A schedule as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ScheduleRecord {
    pub id: i64,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    #[sqlx(try_from = "String")]
    pub catch_up: CatchUp,
    /// The job spec template (TOML).
    pub spec: String,
    pub paused: bool,
    /// The next fire time not yet handled (`i64::MAX` while paused).
    pub next_fire_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

/// What one fire time of a schedule made.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FireRecord {
    pub fire_at_ms: i64,
    pub job_id: Option<i64>,
    pub error: Option<String>,
}

/// Gauges for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct StoreMetrics {
    #[sqlx(rename = "pending", try_from = "i64")]
    pub pending_shards: u64,
    #[sqlx(try_from = "i64")]
    pub pending_rows: u64,
    #[sqlx(rename = "leased", try_from = "i64")]
    pub leased_shards: u64,
    #[sqlx(rename = "running", try_from = "i64")]
    pub running_jobs: u64,
    #[sqlx(rename = "workers", try_from = "i64")]
    pub workers_seen: u64,
    /// Speculative copies of stragglers running.
    #[sqlx(try_from = "i64")]
    pub copies: u64,
}
