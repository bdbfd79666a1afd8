//! The metastore: the single source of truth for jobs, shards, parts and the lease protocol,
//! behind one trait (`Metastore`) made of parts by concern (`Jobs`, `Leases`, `Copies`,
//! `Loops`, `Callbacks`, `Schedules`, `Views`, `Fleet`), each implemented once, in its file of
//! `sql/`. It is written once over SQL, for two dialects (`sqlite.rs` embedded, `postgres.rs`
//! in production) that add only what they do their own way; the lease rules are in
//! `rules.rs`, the merge rule in `merges.rs`. Lease times come from the database clock only.
//! Every lease write is guarded by `(shard, fencing token)`.

pub mod merges;
mod migrations;
pub mod postgres;
mod records;
mod rules;
pub mod speculation;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use nightshift_proto::wire::{
    HeartbeatResponse, InputFile, JobPlan, LeaseRef, LeaseSecret, LeaseStatus, MergeFiles,
    NotifyView, PartRecord, ShardLease,
};
use nightshift_proto::{FailureClass, JobSpec, JobState};

pub use records::{
    FireRecord, JobRecord, LeasedShard, PartRow, RowsAt, ScheduleRecord, ShardRow, ShardTally,
    StoreMetrics, TokenSums, UsageSum, WorkerMachine, WorkerSeen,
};
pub use sql::{Dialect, SqlStore};

use crate::merges::{MergeCandidate, MergeGroup};
use crate::speculation::SpeculationPolicy;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lease lost: shard {shard_id} is no longer held under token {token}")]
    LeaseLost { shard_id: i64, token: i64 },
    #[error("job {job_id} is {state}, not running")]
    JobNotRunning { job_id: i64, state: JobState },
    #[error(
        "checkpoint of shard {shard_id} must start at row {expected}, not {got}: parts must be contiguous"
    )]
    CheckpointGap {
        shard_id: i64,
        expected: u64,
        got: u64,
    },
    #[error("shard {shard_id} cannot complete: {done} of {rows} rows checkpointed")]
    Incomplete { shard_id: i64, done: u64, rows: u64 },
    #[error("job {0} not found")]
    JobNotFound(i64),
    #[error(
        "output `{uri}` overlaps `{owner_uri}`, the output of job {job_id} (`{job}`), which owns it; \
         choose another output"
    )]
    OutputTaken {
        uri: String,
        job_id: i64,
        job: String,
        owner_uri: String,
    },
    #[error("idempotency key `{key}` already names job {job_id}, submitted with another spec")]
    IdempotencyConflict { key: String, job_id: i64 },
    #[error("job {job_id} is {state}: {action} does not apply")]
    BadTransition {
        job_id: i64,
        state: JobState,
        action: &'static str,
    },
    #[error(
        "job {0} cannot be retried: its files were removed when a later job took its output; \
         submit it again"
    )]
    FilesRemoved(i64),
    #[error("a schedule named `{0}` exists already")]
    ScheduleExists(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unreadable row: {0}")]
    Corrupt(String),
    /// A call made for several requests at once failed as a whole; each request gets this,
    /// carrying the store's own error as text.
    #[error("database: {0}")]
    Batch(String),
}

impl StoreError {
    /// A refusal of one lease write (the lease is lost, the job stopped, the shard is not
    /// finished, a checkpoint leaves a gap), as opposed to a failure of the store itself.
    pub fn is_lease_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::LeaseLost { .. }
                | StoreError::JobNotRunning { .. }
                | StoreError::CheckpointGap { .. }
                | StoreError::Incomplete { .. }
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The prefix an output URI owns: the URI with exactly one trailing `/`, so that comparing
/// prefixes matches on path boundaries (`out/a/` is not a prefix of `out/ab/`).
pub fn output_key(uri: &str) -> String {
    format!("{}/", uri.trim_end_matches('/'))
}

/// A fresh secret for one grant, from the thread's cryptographic generator.
pub fn new_lease_secret() -> LeaseSecret {
    LeaseSecret::from_u128(rand::random())
}

/// The current grant of a leased shard, as the lease check reads it, with what checking the
/// grant's parts needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub shard_id: i64,
    pub token: i64,
    pub worker: String,
    pub secret: Option<LeaseSecret>,
    /// Rows of the shard.
    pub rows: u64,
    pub job_uid: String,
    pub output_uri: String,
    /// Merge work's output names (`MergeFiles`), where its part goes instead of a part name.
    pub merge_files: Option<MergeFiles>,
}

/// A job to insert: validated and planned.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub uid: String,
    pub spec: JobSpec,
    pub idempotency_key: Option<String>,
    pub plan: JobPlan,
    /// Enters as `queued` (started later by `start_queued`) rather than `running`.
    pub queued: bool,
    /// `plan` is only its beginning: the rest comes in pieces (`append_plan`).
    pub planning: bool,
}

/// What `resolve_copies` decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Copies that completed first: their parts took the place of the original's.
    pub won: u64,
    /// Copies dropped with their parts: the original completed first, or the copy stopped.
    pub dropped: u64,
}

/// The next piece of a job planned in the background.
#[derive(Debug, Clone)]
pub struct PlanPiece {
    /// Input files recorded before this piece (its first file's index).
    pub after: u64,
    /// Its files, their shards (file indexes counted from the job's first file) and rows.
    pub plan: JobPlan,
    /// Input files the listing found in all, once it has ended (with the last piece).
    pub listed: Option<u64>,
    /// The plan ends with this piece.
    pub last: bool,
}

/// What `create_job` did.
#[derive(Debug, Clone)]
pub enum Submitted {
    Created(JobRecord),
    /// The idempotency key already named a job with the same spec.
    Existing(JobRecord),
}

impl Submitted {
    pub fn job(&self) -> &JobRecord {
        match self {
            Submitted::Created(j) | Submitted::Existing(j) => j,
        }
    }
}

/// Timing of the lease protocol, owned by the coordinator's config.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub ttl_ms: i64,
    /// First retry delay after a failure or expiry; doubles per attempt.
    pub backoff_base_ms: i64,
    pub backoff_max_ms: i64,
}

impl LeaseTiming {
    /// Delay before the next grant of a shard that has been tried `attempts` times.
    pub fn backoff_ms(&self, attempts: i64) -> i64 {
        let exp = attempts.clamp(1, 20) - 1;
        self.backoff_base_ms
            .saturating_mul(1 << exp)
            .min(self.backoff_max_ms)
    }
}

/// One worker's heartbeat, as `heartbeat_many` takes several at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatLot {
    pub worker: String,
    pub leases: Vec<LeaseRef>,
}

/// One worker's lease request, as `claim_many` takes several at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub worker: String,
    pub max: u32,
}

/// Which jobs `list_jobs` answers: at most `limit`, newest first, older than `before_id`,
/// in `state`, named with `name_prefix`, made by the schedule `schedule`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub limit: u32,
    pub before_id: Option<i64>,
    pub state: Option<JobState>,
    pub name_prefix: Option<String>,
    pub schedule: Option<String>,
}

impl JobFilter {
    /// The newest `limit` jobs.
    pub fn newest(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }
}

/// The idempotency key of the job a schedule makes at a fire time.
pub fn schedule_key(schedule: &str, fire_ms: i64) -> String {
    format!("{}{fire_ms}", schedule_key_prefix(schedule))
}

/// What the idempotency key of every job a schedule makes starts with: keys so named are the
/// schedules' own, never a submitter's.
pub const SCHEDULE_KEYS: &str = "schedule:";

/// What the idempotency keys of a schedule's jobs start with.
pub fn schedule_key_prefix(schedule: &str) -> String {
    format!("{SCHEDULE_KEYS}{schedule}:")
}

/// A schedule to insert, checked by the coordinator.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub catch_up: nightshift_proto::CatchUp,
    pub spec: String,
    pub next_fire_at_ms: i64,
}

/// A job's completion callback, taken for one try.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DueNotification {
    pub job_id: i64,
    pub url: String,
    /// 1 for the first try; a retried job counts from 1 again.
    #[sqlx(try_from = "i64")]
    pub attempt: u32,
}

/// What one try of a callback came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyOutcome {
    /// The receiver acknowledged it (a 2xx answer).
    Delivered { status: u16 },
    /// No acknowledgement: an answer of another status, or none (`error`). Tried again in
    /// `retry_in_ms`, or, when `None`, given up (its deadline passed).
    Failed {
        status: Option<u16>,
        error: Option<String>,
        retry_in_ms: Option<i64>,
    },
}

/// How a finished job ends.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    Succeeded,
    Failed(String),
}

/// The metastore: every part below, and its schema. A `dyn Metastore` answers every part's
/// operations.
#[async_trait]
pub trait Metastore:
    Send + Sync + 'static + Jobs + Leases + Copies + Loops + Callbacks + Schedules + Views + Fleet
{
    /// Brings the schema up to date.
    async fn migrate(&self) -> Result<()>;
    /// The database answers and every migration is applied.
    async fn ready(&self) -> Result<bool>;
    /// The database clock.
    async fn now_ms(&self) -> Result<i64>;
}

/// Jobs: submission, reads, cancel, retry and delete (`sql/jobs.rs`).
#[async_trait]
pub trait Jobs: Send + Sync {
    /// Inserts a planned job, its input snapshot and its shards in one transaction, ready to
    /// run. With an idempotency key: the same key and spec returns the existing job; the same
    /// key with another spec is refused. An output that overlaps the output of a job that is
    /// not cancelled is refused (`OutputTaken`).
    async fn create_job(&self, job: NewJob) -> Result<Submitted>;
    /// Records the next piece of a job planned in the background (`NewJob::planning`): its
    /// input files, numbered on from the `piece.after` already recorded, and their shards,
    /// in one transaction. A piece planned meanwhile by another replica (the count is not
    /// `after`), or a job no longer planning (cancelled, failed, deleted), records nothing
    /// and answers false. The last piece ends planning; until then the job is never
    /// finalized and its last merge waits.
    async fn append_plan(&self, job_id: i64, piece: &PlanPiece) -> Result<bool>;
    /// Fails a job whose background planning found a problem (its error is `message`); it
    /// stays marked as planning, so a retry plans on. A job no longer planning is left alone.
    async fn fail_planning(&self, job_id: i64, message: &str) -> Result<()>;
    /// Jobs still being planned that have not ended: what a starting coordinator resumes.
    async fn planning_jobs(&self) -> Result<Vec<JobRecord>>;
    /// Takes, or renews, the claim to plan a job for `ttl_ms`: true while `owner` holds it,
    /// false when another owner's claim has not expired or the job is no longer planning.
    async fn claim_planning(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool>;
    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>>;
    async fn job(&self, id: i64) -> Result<Option<JobRecord>>;
    /// The newest job of that name.
    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>>;
    /// Jobs that pass `filter`, newest first.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>>;
    /// Running jobs, oldest first.
    async fn running_jobs(&self) -> Result<Vec<JobRecord>>;
    /// The cancelled jobs whose output overlaps `uri`'s (a job there now holds it, so none of
    /// them can be retried), oldest first.
    async fn cancelled_at(&self, uri: &str) -> Result<Vec<JobRecord>>;
    async fn shard_counts(&self, job_id: i64) -> Result<ShardTally>;
    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>>;
    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>>;
    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>>;
    /// Cancels a job that has not ended, finalizing included (its commit then stops before
    /// `_SUCCESS`); a cancelled job answers as it is.
    async fn cancel_job(&self, id: i64) -> Result<JobRecord>;
    /// A failed or cancelled job runs again: dead shards go back to pending with fresh
    /// attempts; committed checkpoints stay; a finalizer's claim is dropped; its callback goes
    /// again when it ends again. It runs at once, or, `queued`, waits for `start_queued` as a
    /// job submitted past the running limit does. A cancelled job whose output another job
    /// has taken meanwhile is refused (`OutputTaken`), and so is one whose files were removed
    /// since (`FilesRemoved`).
    async fn retry_job(&self, id: i64, queued: bool) -> Result<JobRecord>;
    /// Notes, before they go, that the files of these cancelled jobs are removed (a later job
    /// took their output): none of them may be retried from its checkpoints any more. A job
    /// not cancelled (retried meanwhile) is left alone. Answers the jobs so marked, by this
    /// call or before it: only their files may go.
    async fn files_removed(&self, job_ids: &[i64]) -> Result<Vec<i64>>;
    /// Starts queued jobs, by priority then submission order, until `max_running` jobs run;
    /// answers the ids started. Replicas doing it at once never pass the limit.
    async fn start_queued(&self, max_running: u32) -> Result<Vec<i64>>;
    /// Removes a job and everything it owns.
    async fn delete_job(&self, id: i64) -> Result<()>;
    /// Notes the rows per model call a worker of the job `job_uid` reports.
    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<()>;
    /// Notes the output schema (`schema`, JSON) of the job `job_uid` unless it has one.
    async fn note_output_schema(&self, job_uid: &str, schema: &str) -> Result<()>;
}

/// The lease protocol: every write guarded by `(shard, fencing token)` (`sql/lease.rs`).
#[async_trait]
pub trait Leases: Send + Sync {
    /// Grants up to `max` pending shards of running jobs, highest priority first.
    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>>;
    /// Several workers' claims at once (a coordinator coalescing concurrent lease requests):
    /// one answer per request, in order, each up to its `max` shards, no shard granted twice.
    /// Earlier requests are served first. Only a failure of the store itself fails the whole
    /// call, and then no shard is granted.
    async fn claim_many(
        &self,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Result<Vec<ShardLease>>>>;
    /// The current grants of those of `shard_ids` that are leased, in any order.
    async fn lease_holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>>;
    /// Extends every lease still held; says which are lost or cancelled.
    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse>;
    /// Several workers' heartbeats at once (a coordinator coalescing concurrent ones): one
    /// answer per request, in order, each what `heartbeat` would give its worker.
    async fn heartbeat_many(
        &self,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>>;
    /// Records a durably written part and moves the checkpoint past it.
    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()>;
    /// Several checkpoints in one transaction (a coordinator coalescing concurrent ones): one
    /// answer each, in order, each what `checkpoint` would give. Only a failure of the store
    /// itself fails the whole call, and then none is recorded.
    async fn checkpoint_many(
        &self,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>>;
    async fn complete(&self, lease: LeaseRef) -> Result<()>;
    /// Completes several shards at once (a worker that finished more than one since it last
    /// called): one answer per lease, in order, each what `complete` called for the leases in
    /// turn would give. Only a failure of the store itself fails the whole call.
    async fn complete_many(&self, leases: &[LeaseRef]) -> Result<Vec<Result<()>>>;
    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()>;
    /// Gives a shard back with its progress; does not count as an attempt.
    async fn release(&self, lease: LeaseRef) -> Result<()>;
}

/// Speculative copies of stragglers (`sql/copies.rs`).
#[async_trait]
pub trait Copies: Send + Sync {
    /// Copies of stragglers for a worker with `max` free slots that found no pending shard
    /// (`speculation.rs` has the rule): at most `max`, never of a shard the worker holds, each
    /// from its original's checkpoint under a lease of its own.
    async fn speculate(
        &self,
        worker: &str,
        max: u32,
        policy: &SpeculationPolicy,
        timing: LeaseTiming,
    ) -> Result<Vec<ShardLease>>;
    /// Decides every race between a shard and its copy that is over: the first to complete
    /// wins, the other's parts past the copy's first row never count, and the loser's lease is
    /// lost. A job with a copy is not settled until its race is decided.
    async fn resolve_copies(&self) -> Result<CopyOutcome>;
}

/// What the background loops ask; each safe to run on several replicas at once (`sql/loops.rs`).
#[async_trait]
pub trait Loops: Send + Sync {
    /// Expired leases go back to pending after a backoff, or dead past max attempts.
    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64>;
    /// Running jobs with no open shards move on: to finalizing, or to failed when shards died
    /// or too many rows were poison.
    async fn settle_jobs(&self) -> Result<u64>;
    /// Takes a finalizing job for `ttl_ms`, unless another finalizer holds it or it waits out
    /// a backoff: the job whose last claim is oldest first (never-claimed jobs before all).
    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>>;
    /// The finalizer holding `job_id` keeps it for `ttl_ms` more (0 gives it up now, so any
    /// replica may take it at its next pass). False when `owner` no longer holds it or the job
    /// is no longer finalizing (cancelled meanwhile).
    async fn extend_finalize(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool>;
    /// Ends a finalizing job (only its finalizer's claim may).
    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()>;
    /// A job's row shards from the first one no merge covers, in order, up to and with the
    /// first that is not done: all the merge rule reads (`merges.rs`).
    async fn merge_candidates(&self, job_id: i64) -> Result<Vec<MergeCandidate>>;
    /// Creates merge work for `groups` of a running job, in order, up to the first it does
    /// not make (made already, or the job stopped meanwhile): the groups after it are planned
    /// again by a later pass, so merges never leave a gap. Answers how many were made.
    async fn create_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64>;
    /// Succeeded jobs whose garbage (parts, uploads left open) is not collected yet, that
    /// ended at least `age_ms` ago (database clock), oldest first, at most `limit`: what a
    /// coordinator that died before collecting it, or a store that refused, left.
    async fn garbage_pending(&self, age_ms: i64, limit: u32) -> Result<Vec<JobRecord>>;
    /// Notes that a succeeded job's garbage is collected.
    async fn garbage_collected(&self, job_id: i64) -> Result<()>;
    /// The files merge work wrote for a job (its output files), in row order.
    async fn merged_parts(&self, job_id: i64) -> Result<Vec<PartRow>>;
    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics>;
    /// For a database no other process uses (local mode, after a crash; the run holds its lock
    /// file): every lease, finalizer and planner claim still marked held is from the dead run, so all
    /// expire now instead of waiting out their TTL; the reaper returns the shards to the queue
    /// and the finalizer takes the job again. Returns the shards freed.
    async fn recover_after_crash(&self) -> Result<u64>;
}

/// Completion callbacks (a job's `[notify] url`), made with the job (`sql/notify.rs`).
#[async_trait]
pub trait Callbacks: Send + Sync {
    /// Takes up to `limit` callbacks of ended jobs that are due, each for one try that holds it
    /// for `hold_ms` (no other replica takes it meanwhile).
    async fn claim_notifications(&self, limit: u32, hold_ms: i64) -> Result<Vec<DueNotification>>;
    /// Records a try's answer and settles the callback by it (delivered, pending again after a
    /// delay, or abandoned), unless the job was retried since: answers whether it settled.
    async fn record_notification(
        &self,
        job_id: i64,
        attempt: u32,
        outcome: &NotifyOutcome,
    ) -> Result<bool>;
    /// The job's callback and its last attempt, if it has one.
    async fn notification(&self, job_id: i64) -> Result<Option<NotifyView>>;
}

/// Schedules and what their fire times made (`sql/schedules.rs`).
#[async_trait]
pub trait Schedules: Send + Sync {
    /// A new schedule; a name already taken is refused (`ScheduleExists`).
    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord>;
    /// Every schedule, by name.
    async fn schedules(&self) -> Result<Vec<ScheduleRecord>>;
    async fn schedule(&self, name: &str) -> Result<Option<ScheduleRecord>>;
    /// Pauses a schedule (`next_fire_at_ms` None), or resumes it from `next_fire_at_ms`.
    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_fire_at_ms: Option<i64>,
    ) -> Result<Option<ScheduleRecord>>;
    /// Removes a schedule and its fire records (not its jobs); false when there was none.
    async fn delete_schedule(&self, name: &str) -> Result<bool>;
    /// Schedules not paused whose next fire time has come (database clock), oldest first.
    async fn due_schedules(&self) -> Result<Vec<ScheduleRecord>>;
    /// Moves a schedule's next fire time on from `from_ms` (as read) to `to_ms`; false when
    /// another pass moved it first.
    async fn advance_schedule(&self, id: i64, from_ms: i64, to_ms: i64) -> Result<bool>;
    /// Records what a fire time made (its job, or why none); the first record stands.
    async fn record_fire(
        &self,
        schedule_id: i64,
        fire_at_ms: i64,
        made: std::result::Result<i64, &str>,
    ) -> Result<()>;
    /// The latest `limit` fire times of a schedule, newest first.
    async fn fires(&self, schedule_id: i64, limit: u32) -> Result<Vec<FireRecord>>;
}

/// What the dashboard reads beyond jobs (`sql/views.rs`).
#[async_trait]
pub trait Views: Send + Sync {
    /// Rows a job committed per `bucket_ms` of the database clock, oldest first.
    async fn rows_over_time(&self, job_id: i64, bucket_ms: i64) -> Result<Vec<RowsAt>>;
    /// Workers that claimed within `window_ms`, or hold a lease now, with the rows their
    /// shards committed within it.
    async fn workers_seen(&self, window_ms: i64) -> Result<Vec<WorkerSeen>>;
    /// Every shard leased now, by worker.
    async fn leased_shards(&self) -> Result<Vec<LeasedShard>>;
    /// A text job's tokens over its committed parts.
    async fn token_sums(&self, job_id: i64) -> Result<TokenSums>;
    /// The spec of the newest job with `hash` that has not ended (lease answers name specs
    /// by hash).
    async fn spec_by_hash(&self, hash: &str) -> Result<Option<JobSpec>>;
}

/// Workers' machines, draining and lease time by machine (`sql/fleet.rs`).
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Records what a worker says about its machine (and that it was seen now).
    async fn note_machine(&self, worker: &str, machine: &WorkerMachine) -> Result<()>;
    /// Forgets workers not seen for `unseen_ms` that hold no lease (a worker id is made per
    /// process, so they only accumulate); answers how many. A job's cost keeps what it needs
    /// of them (`lease_usage`).
    async fn forget_workers(&self, unseen_ms: i64) -> Result<u64>;
    /// Marks a worker to drain; false when no such worker is known.
    async fn request_drain(&self, worker: &str) -> Result<bool>;
    /// Notes that a coordinator told a worker marked to drain (answering its claim or
    /// heartbeat), so the scaler may remove it once it holds no lease.
    async fn drain_told(&self, worker: &str) -> Result<()>;
    /// Workers marked to drain that were seen within `window_ms`.
    async fn draining_workers(&self, window_ms: i64) -> Result<Vec<String>>;
    /// A job's lease time by kind of machine, ended leases and held ones.
    async fn job_usage(&self, job_id: i64) -> Result<Vec<UsageSum>>;
}

pub type DynMetastore = Arc<dyn Metastore>;

/// Opens the store a URL names: `sqlite://path` (or a bare path ending in `.db`) or
/// `postgres://...`, and migrates it.
pub async fn open(url: &str) -> Result<DynMetastore> {
    open_with(url, postgres::DEFAULT_CONNECTIONS).await
}

/// `open`, with at most `connections` database connections at once on PostgreSQL (SQLite
/// keeps its one).
pub async fn open_with(url: &str, connections: u32) -> Result<DynMetastore> {
    let store: DynMetastore = if url.starts_with("postgres://") || url.starts_with("postgresql://")
    {
        Arc::new(postgres::PgStore::connect_with(url, connections).await?)
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Arc::new(sqlite::SqliteStore::open(std::path::Path::new(path)).await?)
    };
    store.migrate().await?;
    Ok(store)
}
