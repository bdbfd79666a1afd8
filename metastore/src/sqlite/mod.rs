//! SQLite store: the embedded default for one machine. SQLite has a single writer, so the
//! lease statements are the PostgreSQL ones without SKIP LOCKED, run through one connection.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::wire::{
    HeartbeatResponse, InputFile, LeaseRef, PartRecord, ShardCounts, ShardLease,
};
use nightshift_proto::{FailureClass, JobState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    JobOutcome, JobRecord, LeaseHolder, LeaseTiming, Metastore, NewJob, PartRow, Result, ShardRow,
    StoreError, StoreMetrics, Submitted, migrations,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

const NOW: &str = "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

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

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // One connection: SQLite has one writer, and a single connection cannot deadlock on
        // lock upgrades.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(60))
            .connect_with(opts)
            .await?;
        Ok(Self { pool })
    }

    async fn now(tx: &mut Transaction<'_, Sqlite>) -> Result<i64> {
        Ok(sqlx::query_scalar(NOW).fetch_one(&mut **tx).await?)
    }

    async fn job_in(tx: &mut Transaction<'_, Sqlite>, id: i64) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Why a guarded lease write touched nothing.
    async fn lease_error(tx: &mut Transaction<'_, Sqlite>, lease: LeaseRef) -> Result<StoreError> {
        let row = sqlx::query(
            "SELECT s.state, s.token, s.checkpoint_rows, s.rows, j.state AS job_state, j.id \
             FROM shards s JOIN jobs j ON j.id = s.job_id WHERE s.id = ?",
        )
        .bind(lease.shard_id)
        .fetch_optional(&mut **tx)
        .await?;
        let lost = StoreError::LeaseLost {
            shard_id: lease.shard_id,
            token: lease.token,
        };
        let Some(row) = row else { return Ok(lost) };
        let state: String = row.try_get("state")?;
        let token: i64 = row.try_get("token")?;
        if state != "leased" || token != lease.token {
            return Ok(lost);
        }
        let job_state = parse_state::<JobState>(&row.try_get::<String, _>("job_state")?)?;
        if job_state != JobState::Running {
            return Ok(StoreError::JobNotRunning {
                job_id: row.try_get("id")?,
                state: job_state,
            });
        }
        let done: i64 = row.try_get("checkpoint_rows")?;
        let rows: i64 = row.try_get("rows")?;
        Ok(StoreError::Incomplete {
            shard_id: lease.shard_id,
            done: done as u64,
            rows: rows as u64,
        })
    }
}

use super::records::{DialectRow, parse_state};
use crate::merges::{MergeCandidate, MergeGroup};

fn job_from_row(row: &SqliteRow) -> Result<JobRecord> {
    row.job()
}

#[async_trait]
impl Metastore for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        migrations::sqlite().run(&self.pool).await?;
        Ok(())
    }

    async fn ready(&self) -> Result<bool> {
        // Before the first migration there is no bookkeeping table: not ready, not an error.
        let tracked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
               WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.pool)
        .await?;
        if !tracked {
            return Ok(false);
        }
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await?;
        Ok(applied as usize >= migrations::sqlite().migrations.len())
    }

    async fn create_job(&self, job: NewJob) -> Result<Submitted> {
        jobs::create_job(self, job).await
    }

    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>> {
        jobs::job_by_key(self, key).await
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        jobs::job(self, id).await
    }

    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>> {
        jobs::job_by_name(self, name).await
    }

    async fn list_jobs(&self, limit: u32) -> Result<Vec<JobRecord>> {
        jobs::list_jobs(self, limit).await
    }

    async fn shard_counts(&self, job_id: i64) -> Result<(ShardCounts, u64, u64)> {
        jobs::shard_counts(self, job_id).await
    }

    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        jobs::shards(self, job_id).await
    }

    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>> {
        jobs::input_files(self, job_id).await
    }

    async fn cancel_job(&self, id: i64) -> Result<JobRecord> {
        jobs::cancel_job(self, id).await
    }

    async fn retry_job(&self, id: i64) -> Result<JobRecord> {
        jobs::retry_job(self, id).await
    }

    async fn delete_job(&self, id: i64) -> Result<()> {
        jobs::delete_job(self, id).await
    }

    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>> {
        lease::claim(self, worker, max, timing).await
    }

    async fn lease_holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        lease::holders(self, shard_ids).await
    }

    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        lease::heartbeat(self, worker, leases, timing).await
    }

    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<()> {
        sqlx::query("UPDATE jobs SET batch_rows = ? WHERE uid = ? AND batch_rows IS NOT ?")
            .bind(i64::try_from(rows).unwrap_or(i64::MAX))
            .bind(job_uid)
            .bind(i64::try_from(rows).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        lease::checkpoint(self, lease, part).await
    }

    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        lease::complete(self, lease).await
    }

    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        lease::fail(self, lease, class, message, timing).await
    }

    async fn release(&self, lease: LeaseRef) -> Result<()> {
        lease::release(self, lease).await
    }

    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64> {
        loops::reap_expired(self, timing).await
    }

    async fn settle_jobs(&self) -> Result<u64> {
        loops::settle_jobs(self).await
    }

    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>> {
        loops::claim_finalize(self, owner, ttl_ms).await
    }

    async fn extend_finalize(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool> {
        let now: i64 = sqlx::query_scalar(NOW).fetch_one(&self.pool).await?;
        let n = sqlx::query(
            "UPDATE jobs SET finalizer_expires_at_ms = ? \
             WHERE id = ? AND finalizer_owner = ? AND state = 'finalizing'",
        )
        .bind(now + ttl_ms)
        .bind(job_id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        loops::parts(self, job_id).await
    }

    async fn merged_parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        merges::merged(self, job_id).await
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
        merges::candidates(self, job_id).await
    }

    async fn create_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64> {
        merges::insert(self, job_id, groups).await
    }

    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()> {
        loops::finish_job(self, job_id, owner, outcome).await
    }

    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics> {
        loops::metrics(self, workers_window_ms).await
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(NOW).fetch_one(&self.pool).await?)
    }

    async fn recover_after_crash(&self) -> Result<u64> {
        sqlx::query(super::EXPIRE_FINALIZER_CLAIMS)
            .execute(&self.pool)
            .await?;
        let freed = sqlx::query(super::EXPIRE_LEASES)
            .execute(&self.pool)
            .await?;
        Ok(freed.rows_affected())
    }
}
