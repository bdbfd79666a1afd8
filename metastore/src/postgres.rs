//! PostgreSQL store: the production store, shared by every coordinator replica. Each lease
//! transition is one guarded statement; claims, the reaper and the finalizer skip rows another
//! replica has locked, so every background loop is safe to run on several replicas at once.
//! Times come from the database clock only (`ns_now_ms()`, defined by the first migration), and
//! no transaction outlives the method call that opened it.

/// The columns `job_from_row` reads, in a form `concat!` accepts.
macro_rules! job_cols {
    () => {
        "id, uid, name, idempotency_key, spec_json, spec_hash, state, priority, rows_total, \
         output_uri, error, created_at_ms, started_at_ms, finished_at_ms, batch_rows"
    };
}

mod jobs;
mod lease;
mod loops;
mod merges;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::FailureClass;
use nightshift_proto::wire::{
    HeartbeatResponse, InputFile, LeaseRef, PartRecord, ShardCounts, ShardLease,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgExecutor, Row};

use super::{
    ClaimRequest, JobOutcome, JobRecord, LeaseHolder, LeaseTiming, Metastore, NewJob, PartRow,
    Result, ShardRow, StoreMetrics, Submitted, migrations,
};

/// Connections per coordinator replica. Every statement is short, so a few go a long way.
const POOL_SIZE: u32 = 16;
/// How long a call waits for a free connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// PostgreSQL store.
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database a `postgres://` URL names. Does not migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = PgConnectOptions::from_str(url)?.application_name("nightshift-coordinator");
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }
}

/// Reads one job by id through any executor (the pool or an open transaction).
async fn job_in<'e, E: PgExecutor<'e>>(ex: E, id: i64) -> Result<Option<JobRecord>> {
    let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

use super::records::{DialectRow, parse_spec, parse_state};
use crate::merges::{MergeCandidate, MergeGroup};

fn job_from_row(row: &PgRow) -> Result<JobRecord> {
    row.job()
}

#[async_trait]
impl Metastore for PgStore {
    async fn migrate(&self) -> Result<()> {
        // sqlx takes an advisory lock, so replicas starting together migrate once.
        migrations::postgres().run(&self.pool).await?;
        Ok(())
    }

    async fn ready(&self) -> Result<bool> {
        // Before the first migration there is no bookkeeping table: not ready, not an error.
        let tracked: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        if !tracked {
            return Ok(false);
        }
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(applied as usize >= migrations::postgres().migrations.len())
    }

    async fn create_job(&self, job: NewJob) -> Result<Submitted> {
        self.insert_job(job).await
    }

    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>> {
        self.job_by_key_in(key).await
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        job_in(&self.pool, id).await
    }

    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE name = $1 ORDER BY id DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs ORDER BY id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn shard_counts(&self, job_id: i64) -> Result<(ShardCounts, u64, u64)> {
        self.counts(job_id).await
    }

    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        self.shard_rows(job_id).await
    }

    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>> {
        let rows =
            sqlx::query("SELECT uri, size, etag FROM input_files WHERE job_id = $1 ORDER BY idx")
                .bind(job_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| r.input_file()).collect()
    }

    async fn cancel_job(&self, id: i64) -> Result<JobRecord> {
        self.cancel(id).await
    }

    async fn retry_job(&self, id: i64) -> Result<JobRecord> {
        self.retry(id).await
    }

    async fn delete_job(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>> {
        self.claim_shards(worker, max, timing).await
    }

    async fn claim_many(
        &self,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Result<Vec<ShardLease>>>> {
        Ok(self
            .claim_for(requests, timing)
            .await?
            .into_iter()
            .map(Ok)
            .collect())
    }

    async fn lease_holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        self.holders(shard_ids).await
    }

    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        self.heartbeat(worker, leases, timing).await
    }

    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET batch_rows = $1 WHERE uid = $2 AND batch_rows IS DISTINCT FROM $1",
        )
        .bind(i64::try_from(rows).unwrap_or(i64::MAX))
        .bind(job_uid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        self.checkpoint(lease, part).await
    }

    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        self.finish_shard(lease).await
    }

    async fn complete_many(&self, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        self.finish_shards(leases).await
    }

    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        self.fail_shard(lease, class, message, timing).await
    }

    async fn release(&self, lease: LeaseRef) -> Result<()> {
        self.release_shard(lease).await
    }

    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64> {
        self.reap(timing).await
    }

    async fn settle_jobs(&self) -> Result<u64> {
        self.settle().await
    }

    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>> {
        self.take_finalize(owner, ttl_ms).await
    }

    async fn extend_finalize(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET finalizer_expires_at_ms = ns_now_ms() + $3 \
             WHERE id = $1 AND finalizer_owner = $2 AND state = 'finalizing'",
        )
        .bind(job_id)
        .bind(owner)
        .bind(ttl_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        self.part_rows(job_id).await
    }

    async fn merged_parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        self.merged(job_id).await
    }

    async fn running_jobs(&self) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE state = 'running' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn merge_candidates(&self, job_id: i64) -> Result<Vec<MergeCandidate>> {
        self.candidates(job_id).await
    }

    async fn create_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64> {
        self.insert_merges(job_id, groups).await
    }

    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()> {
        self.finish_job(job_id, owner, outcome).await
    }

    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics> {
        let row = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM shards s JOIN jobs j ON j.id = s.job_id \
                  WHERE s.state = 'pending' AND j.state = 'running' AND s.kind = 'rows') \
                  AS pending, \
               (SELECT COALESCE(SUM(s.rows - s.checkpoint_rows), 0)::BIGINT FROM shards s \
                  JOIN jobs j ON j.id = s.job_id \
                  WHERE s.state = 'pending' AND j.state = 'running' AND s.kind = 'rows') \
                  AS pending_rows, \
               (SELECT COUNT(*) FROM shards WHERE state = 'leased') AS leased, \
               (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS running, \
               (SELECT COUNT(*) FROM workers WHERE last_seen_ms > ns_now_ms() - $1) AS workers",
        )
        .bind(workers_window_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(StoreMetrics {
            pending_shards: row.try_get::<i64, _>("pending")? as u64,
            pending_rows: row.try_get::<i64, _>("pending_rows")? as u64,
            leased_shards: row.try_get::<i64, _>("leased")? as u64,
            running_jobs: row.try_get::<i64, _>("running")? as u64,
            workers_seen: row.try_get::<i64, _>("workers")? as u64,
        })
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT ns_now_ms()")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn recover_after_crash(&self) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(super::EXPIRE_FINALIZER_CLAIMS)
            .execute(&mut *tx)
            .await?;
        let freed = sqlx::query(super::EXPIRE_LEASES).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(freed.rows_affected())
    }
}
