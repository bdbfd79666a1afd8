//! What the background loops ask of SQLite: reaping, settling, finalizing, metrics.

use sqlx::Row;

use super::{SqliteStore, job_from_row};
use crate::records::{DialectRow, PART_COLUMNS};
use crate::{JobOutcome, JobRecord, LeaseTiming, PartRow, Result, StoreError, StoreMetrics};

pub(super) async fn reap_expired(s: &SqliteStore, timing: LeaseTiming) -> Result<u64> {
    let mut tx = s.pool.begin().await?;
    let now = SqliteStore::now(&mut tx).await?;
    let rows = sqlx::query(
        "SELECT s.id, s.attempts, j.max_attempts FROM shards s JOIN jobs j ON j.id = s.job_id \
         WHERE s.state = 'leased' AND s.lease_expires_at_ms < ?",
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let mut n = 0;
    for r in &rows {
        let attempts: i64 = r.try_get("attempts")?;
        let max: i64 = r.try_get("max_attempts")?;
        n += sqlx::query(
            "UPDATE shards SET state = ?, not_before_ms = ?, worker_id = NULL, \
             lease_expires_at_ms = NULL, error = 'lease expired: worker presumed dead', \
             error_class = 'retryable' WHERE id = ? AND state = 'leased' AND lease_expires_at_ms < ?",
        )
        .bind(if attempts >= max { "dead" } else { "pending" })
        .bind(now + timing.backoff_ms(attempts))
        .bind(r.try_get::<i64, _>("id")?)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn settle_jobs(s: &SqliteStore) -> Result<u64> {
    let mut tx = s.pool.begin().await?;
    // Jobs without shards count too: with nothing to run they have nothing to wait for.
    let rows = sqlx::query(concat!(
        "SELECT ",
        job_cols!(),
        ", (SELECT COUNT(*) FROM shards s WHERE s.job_id = jobs.id AND s.state = 'dead') \
             AS dead, \
           (SELECT COALESCE(SUM(s.error_rows), 0) FROM shards s \
             WHERE s.job_id = jobs.id AND s.kind = 'rows') AS error_rows, \
           (SELECT MIN(s.id) FROM shards s WHERE s.job_id = jobs.id AND s.state = 'dead') \
             AS first_dead, \
           EXISTS (SELECT 1 FROM shards r WHERE r.job_id = jobs.id AND r.kind = 'rows' \
             AND r.id > COALESCE((SELECT MAX(m.merge_last) FROM shards m \
               WHERE m.job_id = jobs.id AND m.kind = 'merge'), 0)) AS unmerged \
         FROM jobs WHERE state = 'running' AND NOT EXISTS ( \
           SELECT 1 FROM shards s \
           WHERE s.job_id = jobs.id AND s.state IN ('pending', 'leased')) \
         ORDER BY id"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let now = SqliteStore::now(&mut tx).await?;
    let mut n = 0;
    for r in rows {
        let job = job_from_row(&r)?;
        let dead: i64 = r.try_get("dead")?;
        let failure = if dead > 0 {
            let first: i64 = r.try_get("first_dead")?;
            let error: Option<String> = sqlx::query_scalar("SELECT error FROM shards WHERE id = ?")
                .bind(first)
                .fetch_one(&mut *tx)
                .await?;
            Some(crate::records::dead_shards_message(
                dead,
                first,
                error.as_deref(),
            ))
        } else {
            // Checkpoints fail a job when its poison rows pass the threshold; this catches
            // a job that comes back (retry) with them already past it.
            let errors: i64 = r.try_get("error_rows")?;
            crate::records::error_threshold_exceeded(&job, errors as u64)
        };
        if failure.is_none() && r.try_get::<bool, _>("unmerged")? {
            // Its merge work is still to be queued (`loops.rs: plan_merges`).
            continue;
        }
        n += match failure {
            Some(message) => sqlx::query(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at_ms = ? \
                 WHERE id = ? AND state = 'running'",
            )
            .bind(message)
            .bind(now)
            .bind(job.id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            None => sqlx::query(
                "UPDATE jobs SET state = 'finalizing' WHERE id = ? AND state = 'running'",
            )
            .bind(job.id)
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
    }
    tx.commit().await?;
    Ok(n)
}

pub(super) async fn claim_finalize(
    s: &SqliteStore,
    owner: &str,
    ttl_ms: i64,
) -> Result<Option<JobRecord>> {
    let mut tx = s.pool.begin().await?;
    let now = SqliteStore::now(&mut tx).await?;
    let id: Option<i64> = sqlx::query_scalar(
        "UPDATE jobs SET finalizer_owner = ?, finalizer_expires_at_ms = ? \
         WHERE id = (SELECT id FROM jobs WHERE state = 'finalizing' \
                     AND (finalizer_expires_at_ms IS NULL OR finalizer_expires_at_ms < ?) \
                     ORDER BY finalizer_expires_at_ms NULLS FIRST, id LIMIT 1) RETURNING id",
    )
    .bind(owner)
    .bind(now + ttl_ms)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let job = match id {
        Some(id) => SqliteStore::job_in(&mut tx, id).await?,
        None => None,
    };
    tx.commit().await?;
    Ok(job)
}

pub(super) async fn parts(s: &SqliteStore, job_id: i64) -> Result<Vec<PartRow>> {
    let sql = format!(
        "SELECT {PART_COLUMNS} FROM parts p WHERE p.job_id = ? ORDER BY p.shard_id, p.row_start"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .fetch_all(&s.pool)
        .await?;
    rows.iter().map(|r| r.part()).collect()
}

pub(super) async fn finish_job(
    s: &SqliteStore,
    job_id: i64,
    owner: &str,
    outcome: JobOutcome,
) -> Result<()> {
    let mut tx = s.pool.begin().await?;
    let now = SqliteStore::now(&mut tx).await?;
    let (state, error) = match outcome {
        JobOutcome::Succeeded => ("succeeded", None),
        JobOutcome::Failed(e) => ("failed", Some(e)),
    };
    let n = sqlx::query(
        "UPDATE jobs SET state = ?, error = ?, finished_at_ms = ?, finalizer_owner = NULL, \
         finalizer_expires_at_ms = NULL WHERE id = ? AND state = 'finalizing' AND finalizer_owner = ?",
    )
    .bind(state)
    .bind(error)
    .bind(now)
    .bind(job_id)
    .bind(owner)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        let job = SqliteStore::job_in(&mut tx, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        return Err(StoreError::BadTransition {
            job_id,
            state: job.state,
            action: "finish",
        });
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn metrics(s: &SqliteStore, workers_window_ms: i64) -> Result<StoreMetrics> {
    let row = sqlx::query(
        "SELECT \
           (SELECT COUNT(*) FROM shards s JOIN jobs j ON j.id = s.job_id \
              WHERE s.state = 'pending' AND j.state = 'running' AND s.kind = 'rows') AS pending, \
           (SELECT COALESCE(SUM(s.rows - s.checkpoint_rows), 0) FROM shards s \
              JOIN jobs j ON j.id = s.job_id \
              WHERE s.state = 'pending' AND j.state = 'running' AND s.kind = 'rows') AS pending_rows, \
           (SELECT COUNT(*) FROM shards WHERE state = 'leased') AS leased, \
           (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS running, \
           (SELECT COUNT(*) FROM workers WHERE last_seen_ms > \
              CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - ?) AS workers",
    )
    .bind(workers_window_ms)
    .fetch_one(&s.pool)
    .await?;
    Ok(StoreMetrics {
        pending_shards: row.try_get::<i64, _>("pending")? as u64,
        pending_rows: row.try_get::<i64, _>("pending_rows")? as u64,
        leased_shards: row.try_get::<i64, _>("leased")? as u64,
        running_jobs: row.try_get::<i64, _>("running")? as u64,
        workers_seen: row.try_get::<i64, _>("workers")? as u64,
    })
}
