//! The metastore over SQL, written once for both dialects. Statements use `$n` parameters
//! (both dialects read them), bind every state through its enum, and name the few fragments
//! that differ in braces (`{now}`, `{skip_locked}`, `{lock_row}`), which `Dialect::sql` fills
//! in. A dialect adds only what its SQL cannot share: opening the database, the output lock,
//! and the set-based statements PostgreSQL runs where SQLite takes requests one by one.

mod copies;
mod fleet;
pub(crate) mod jobs;
pub(crate) mod lease;
mod loops;
mod notify;
mod schedules;
mod views;

use std::borrow::Cow;

use async_trait::async_trait;
use nightshift_proto::wire::{HeartbeatResponse, LeaseRef, LeaseStatus, ShardLease};
use sqlx::pool::PoolConnection;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type};

use nightshift_proto::FailureClass;
use nightshift_proto::wire::{InputFile, JobPlan, NotifyView, PartRecord};

use crate::merges::{MergeCandidate, MergeGroup};
use crate::records::{
    FireRecord, LeasedShard, RowsAt, ScheduleRecord, ShardTally, TokenSums, UsageSum,
    WorkerMachine, WorkerSeen,
};
use crate::speculation::SpeculationPolicy;
use crate::{
    ClaimRequest, CopyOutcome, DueNotification, HeartbeatLot, JobFilter, JobOutcome, JobRecord,
    LeaseHolder, LeaseTiming, Metastore, NewJob, NewSchedule, NotifyOutcome, PartRow, PlanPiece,
    Result, ShardRow, StoreMetrics, Submitted,
};

/// A value both dialects bind and read.
pub trait Value<DB: Database>: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> {}
impl<DB: Database, T> Value<DB> for T where
    T: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>
{
}

/// A row of a dialect.
pub type RowOf<D> = <<D as Dialect>::DB as Database>::Row;

/// One SQL dialect: its database, the fragments its statements differ by, and the operations
/// it runs its own way.
#[async_trait]
pub trait Dialect: Send + Sync + Sized + 'static {
    type DB: Database<Arguments = Self::Args>;
    type Args: IntoArguments<Self::DB>;
    /// A connection as a statement runs on it.
    type Ex<'c>: Executor<'c, Database = Self::DB>;

    /// The database clock in milliseconds since the epoch, as an SQL expression.
    const NOW: &'static str;
    /// Appended to a query that picks rows to change: skip rows another session holds.
    const SKIP_LOCKED: &'static str;
    /// Appended to a query of a job row to change: hold it until the transaction ends.
    const LOCK_ROW: &'static str;
    /// Whether the migrations' bookkeeping table exists.
    const MIGRATED: &'static str;

    fn ex(conn: &mut Conn<Self>) -> Self::Ex<'_>;
    /// Rows a statement changed.
    fn affected(done: &<Self::DB as Database>::QueryResult) -> u64;
    fn migrator() -> sqlx::migrate::Migrator;
    async fn migrate(pool: &Pool<Self::DB>) -> Result<()>;

    /// Serialises the output check and insert of submissions and retries until `tx` ends.
    async fn lock_outputs(conn: &mut Conn<Self>) -> Result<()>;
    /// Inserts a job's input files (numbered from `first_file`) and shards, shard ids in plan
    /// order.
    async fn insert_plan(
        conn: &mut Conn<Self>,
        job_id: i64,
        plan: &JobPlan,
        first_file: u64,
    ) -> Result<()>;
    /// Runs after a job is committed (PostgreSQL refreshes statistics for a large one).
    async fn after_create(store: &SqlStore<Self>, shards: usize);
    async fn claim_many(
        store: &SqlStore<Self>,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>>;
    async fn heartbeat_many(
        store: &SqlStore<Self>,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>>;
    async fn checkpoint_many(
        store: &SqlStore<Self>,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>>;
    async fn complete_many(store: &SqlStore<Self>, leases: &[LeaseRef]) -> Result<Vec<Result<()>>>;
    async fn lease_holders(store: &SqlStore<Self>, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>>;

    /// A statement with this dialect's fragments filled in.
    fn sql(text: &str) -> sqlx::AssertSqlSafe<String> {
        let mut sql = Cow::Borrowed(text);
        for (name, fragment) in [
            ("{now}", Self::NOW),
            ("{skip_locked}", Self::SKIP_LOCKED),
            ("{lock_row}", Self::LOCK_ROW),
            ("{job}", crate::records::JOB_COLUMNS),
            ("{shard}", crate::records::SHARD_COLUMNS),
            ("{part}", crate::records::PART_COLUMNS),
            ("{granted}", crate::records::GRANTED_COLUMNS),
        ] {
            if sql.contains(name) {
                sql = Cow::Owned(sql.replace(name, fragment));
            }
        }
        sqlx::AssertSqlSafe(sql.into_owned())
    }
}

/// The metastore on a database of dialect `D`.
pub struct SqlStore<D: Dialect> {
    pub(crate) pool: Pool<D::DB>,
    /// For writes whose loss in a crash of the database only makes a worker redo fenced
    /// work (lease extensions, checkpoints, completions): on PostgreSQL its commits do not
    /// wait for the log to reach the disk, and they and the lease check's read keep one plan
    /// made for any parameters (see `postgres.rs`); elsewhere it is `pool`.
    pub(crate) relaxed: Pool<D::DB>,
    /// For claims: durable commits, but on PostgreSQL one plan made for any parameters and
    /// kept (see `postgres.rs`); elsewhere it is `pool`.
    pub(crate) claims: Pool<D::DB>,
}

impl<D: Dialect> SqlStore<D> {
    pub(crate) fn new(pool: Pool<D::DB>) -> Self {
        Self {
            relaxed: pool.clone(),
            claims: pool.clone(),
            pool,
        }
    }

    /// A connection of the pool.
    pub(crate) async fn conn(&self) -> Result<PoolConnection<D::DB>> {
        Ok(self.pool.acquire().await?)
    }
}

/// A connection of a dialect.
pub type Conn<D> = <<D as Dialect>::DB as Database>::Connection;

#[async_trait]
impl<D: Dialect> Metastore for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    async fn migrate(&self) -> Result<()> {
        D::migrate(&self.pool).await
    }

    async fn ready(&self) -> Result<bool> {
        // Before the first migration there is no bookkeeping table: not ready, not an error.
        let mut conn = self.conn().await?;
        let tracked: bool = sqlx::query_scalar(D::MIGRATED)
            .fetch_one(D::ex(&mut conn))
            .await?;
        if !tracked {
            return Ok(false);
        }
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(D::ex(&mut conn))
                .await?;
        Ok(usize::try_from(applied).unwrap_or(0) >= D::migrator().migrations.len())
    }

    async fn create_job(&self, job: NewJob) -> Result<Submitted> {
        self.create_job(job).await
    }

    async fn append_plan(&self, job_id: i64, piece: &PlanPiece) -> Result<bool> {
        self.append_plan(job_id, piece).await
    }

    async fn fail_planning(&self, job_id: i64, message: &str) -> Result<()> {
        self.fail_planning(job_id, message).await
    }

    async fn planning_jobs(&self) -> Result<Vec<JobRecord>> {
        self.planning_jobs().await
    }

    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>> {
        Self::job_by_key_in(&mut *self.conn().await?, key).await
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        Self::job_in(&mut *self.conn().await?, id).await
    }

    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>> {
        self.job_by_name(name).await
    }

    async fn cancelled_at(&self, uri: &str) -> Result<Vec<JobRecord>> {
        self.cancelled_at(uri).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        self.list_jobs(filter).await
    }

    async fn shard_counts(&self, job_id: i64) -> Result<ShardTally> {
        self.shard_counts(job_id).await
    }

    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        self.shards(job_id).await
    }

    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>> {
        self.input_files(job_id).await
    }

    async fn cancel_job(&self, id: i64) -> Result<JobRecord> {
        self.cancel_job(id).await
    }

    async fn retry_job(&self, id: i64, queued: bool) -> Result<JobRecord> {
        self.retry_job(id, queued).await
    }

    async fn files_removed(&self, job_ids: &[i64]) -> Result<()> {
        self.files_removed(job_ids).await
    }

    async fn start_queued(&self, max_running: u32) -> Result<Vec<i64>> {
        self.start_queued(max_running).await
    }

    async fn delete_job(&self, id: i64) -> Result<()> {
        self.delete_job(id).await
    }

    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>> {
        let request = ClaimRequest {
            worker: worker.to_string(),
            max,
        };
        let mut answers = D::claim_many(self, std::slice::from_ref(&request), timing).await?;
        Ok(answers.pop().unwrap_or_default())
    }

    async fn claim_many(
        &self,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Result<Vec<ShardLease>>>> {
        let answers = D::claim_many(self, requests, timing).await?;
        Ok(answers.into_iter().map(Ok).collect())
    }

    async fn lease_holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        D::lease_holders(self, shard_ids).await
    }

    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        let lot = HeartbeatLot {
            worker: worker.to_string(),
            leases: leases.to_vec(),
        };
        let mut answers = D::heartbeat_many(self, std::slice::from_ref(&lot), timing).await?;
        Ok(HeartbeatResponse {
            leases: answers.pop().unwrap_or_default(),
            drain: false,
        })
    }

    async fn heartbeat_many(
        &self,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>> {
        D::heartbeat_many(self, requests, timing).await
    }

    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<()> {
        self.note_batch_rows(job_uid, rows).await
    }

    async fn note_output_schema(&self, job_uid: &str, schema: &str) -> Result<()> {
        self.note_output_schema(job_uid, schema).await
    }

    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        self.checkpoint(lease, part).await
    }

    async fn checkpoint_many(
        &self,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>> {
        D::checkpoint_many(self, checkpoints).await
    }

    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        self.complete(lease).await
    }

    async fn complete_many(&self, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        D::complete_many(self, leases).await
    }

    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        self.fail(lease, class, message, timing).await
    }

    async fn release(&self, lease: LeaseRef) -> Result<()> {
        self.release(lease).await
    }

    async fn speculate(
        &self,
        worker: &str,
        max: u32,
        policy: &SpeculationPolicy,
        timing: LeaseTiming,
    ) -> Result<Vec<ShardLease>> {
        self.speculate(worker, max, policy, timing).await
    }

    async fn resolve_copies(&self) -> Result<CopyOutcome> {
        self.resolve_copies().await
    }

    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64> {
        self.reap_expired(timing).await
    }

    async fn settle_jobs(&self) -> Result<u64> {
        self.settle_jobs().await
    }

    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>> {
        self.claim_finalize(owner, ttl_ms).await
    }

    async fn extend_finalize(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool> {
        self.extend_finalize(job_id, owner, ttl_ms).await
    }

    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        self.parts(job_id).await
    }

    async fn merged_parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        self.merged_parts(job_id).await
    }

    async fn running_jobs(&self) -> Result<Vec<JobRecord>> {
        self.running_jobs().await
    }

    async fn merge_candidates(&self, job_id: i64) -> Result<Vec<MergeCandidate>> {
        self.merge_candidates(job_id).await
    }

    async fn create_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64> {
        self.create_merges(job_id, groups).await
    }

    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()> {
        self.finish_job(job_id, owner, outcome).await
    }

    async fn claim_notifications(&self, limit: u32, hold_ms: i64) -> Result<Vec<DueNotification>> {
        self.claim_notifications(limit, hold_ms).await
    }

    async fn record_notification(
        &self,
        job_id: i64,
        attempt: u32,
        outcome: &NotifyOutcome,
    ) -> Result<bool> {
        self.record_notification(job_id, attempt, outcome).await
    }

    async fn notification(&self, job_id: i64) -> Result<Option<NotifyView>> {
        self.notification(job_id).await
    }

    async fn create_schedule(&self, schedule: NewSchedule) -> Result<ScheduleRecord> {
        self.create_schedule(schedule).await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRecord>> {
        self.schedules().await
    }

    async fn schedule(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        self.schedule(name).await
    }

    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_fire_at_ms: Option<i64>,
    ) -> Result<Option<ScheduleRecord>> {
        self.set_schedule_paused(name, paused, next_fire_at_ms)
            .await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool> {
        self.delete_schedule(name).await
    }

    async fn due_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        self.due_schedules().await
    }

    async fn advance_schedule(&self, id: i64, from_ms: i64, to_ms: i64) -> Result<bool> {
        self.advance_schedule(id, from_ms, to_ms).await
    }

    async fn record_fire(
        &self,
        schedule_id: i64,
        fire_at_ms: i64,
        made: std::result::Result<i64, &str>,
    ) -> Result<()> {
        self.record_fire(schedule_id, fire_at_ms, made).await
    }

    async fn fires(&self, schedule_id: i64, limit: u32) -> Result<Vec<FireRecord>> {
        self.fires(schedule_id, limit).await
    }

    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics> {
        self.metrics(workers_window_ms).await
    }

    async fn rows_over_time(&self, job_id: i64, bucket_ms: i64) -> Result<Vec<RowsAt>> {
        self.rows_over_time(job_id, bucket_ms).await
    }

    async fn workers_seen(&self, window_ms: i64) -> Result<Vec<WorkerSeen>> {
        self.workers_seen(window_ms).await
    }

    async fn leased_shards(&self) -> Result<Vec<LeasedShard>> {
        self.leased_shards().await
    }

    async fn token_sums(&self, job_id: i64) -> Result<TokenSums> {
        self.token_sums(job_id).await
    }

    async fn spec_by_hash(&self, hash: &str) -> Result<Option<nightshift_proto::JobSpec>> {
        self.spec_by_hash(hash).await
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(D::sql("SELECT {now}"))
            .fetch_one(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn recover_after_crash(&self) -> Result<u64> {
        self.recover_after_crash().await
    }

    async fn note_machine(&self, worker: &str, machine: &WorkerMachine) -> Result<()> {
        self.note_machine(worker, machine).await
    }

    async fn request_drain(&self, worker: &str) -> Result<bool> {
        self.request_drain(worker).await
    }

    async fn drain_told(&self, worker: &str) -> Result<()> {
        self.drain_told(worker).await
    }

    async fn draining_workers(&self, window_ms: i64) -> Result<Vec<String>> {
        self.draining_workers(window_ms).await
    }

    async fn job_usage(&self, job_id: i64) -> Result<Vec<UsageSum>> {
        self.job_usage(job_id).await
    }
}
