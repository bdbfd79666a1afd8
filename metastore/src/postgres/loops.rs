//! The background loops' statements on PostgreSQL: reaper, settler and finalizer claims. Each
//! is safe when several replicas run it at once: rows are taken with SKIP LOCKED, and every
//! transition is guarded by the state it leaves.

use sqlx::Row;

use super::lease::backoff_table;
use super::{PgStore, job_from_row, job_in};
use crate::records::{dead_shards_message, error_threshold_exceeded};
use crate::{JobOutcome, JobRecord, LeaseTiming, Result, StoreError};

/// Expired leases one reaper statement takes; the reaper goes on while batches come back full.
const REAP_BATCH: i64 = 1000;
/// Batches in one `reap_expired` call, so one call stays bounded.
const REAP_MAX_BATCHES: u32 = 100;

impl PgStore {
    pub(super) async fn reap(&self, timing: LeaseTiming) -> Result<u64> {
        let backoff = backoff_table(timing);
        let mut total = 0;
        for _ in 0..REAP_MAX_BATCHES {
            let n = sqlx::query(
                "UPDATE shards s SET \
                   state = CASE WHEN s.attempts >= j.max_attempts THEN 'dead' \
                                ELSE 'pending' END, \
                   not_before_ms = ns_now_ms() \
                     + ($1::BIGINT[])[LEAST(GREATEST(s.attempts, 0), 20) + 1], \
                   worker_id = NULL, lease_expires_at_ms = NULL, \
                   error = 'lease expired: worker presumed dead', error_class = 'retryable' \
                 FROM jobs j \
                 WHERE j.id = s.job_id AND s.state = 'leased' \
                   AND s.lease_expires_at_ms < ns_now_ms() \
                   AND s.id IN ( \
                     SELECT id FROM shards \
                     WHERE state = 'leased' AND lease_expires_at_ms < (SELECT ns_now_ms()) \
                     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(&backoff)
            .bind(REAP_BATCH)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < REAP_BATCH as u64 {
                break;
            }
        }
        Ok(total)
    }

    /// Running jobs with no pending or leased shard move on. A shard cannot reopen while its
    /// job runs, so deciding first and updating under a `state = 'running'` guard is safe; of
    /// two replicas settling the same job, one update wins and only it is counted.
    pub(super) async fn settle(&self) -> Result<u64> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            ", (SELECT COUNT(*) FROM shards s WHERE s.job_id = jobs.id AND s.state = 'dead') \
                 AS dead, \
               (SELECT COALESCE(SUM(s.error_rows), 0)::BIGINT FROM shards s \
                 WHERE s.job_id = jobs.id AND s.kind = 'rows') AS error_rows, \
               EXISTS (SELECT 1 FROM shards r WHERE r.job_id = jobs.id AND r.kind = 'rows' \
                 AND r.id > COALESCE((SELECT MAX(m.merge_last) FROM shards m \
                   WHERE m.job_id = jobs.id AND m.kind = 'merge'), 0)) AS unmerged, \
               d.first_dead, d.first_error \
             FROM jobs LEFT JOIN LATERAL ( \
               SELECT s.id AS first_dead, s.error AS first_error FROM shards s \
               WHERE s.job_id = jobs.id AND s.state = 'dead' ORDER BY s.id LIMIT 1 \
             ) d ON TRUE \
             WHERE jobs.state = 'running' AND NOT EXISTS ( \
               SELECT 1 FROM shards s \
               WHERE s.job_id = jobs.id AND s.state IN ('pending', 'leased')) \
             ORDER BY jobs.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let mut settled = 0;
        for row in rows {
            let job = job_from_row(&row)?;
            let dead: i64 = row.try_get("dead")?;
            let error_rows: i64 = row.try_get("error_rows")?;
            let failure = if dead > 0 {
                let first: i64 = row.try_get("first_dead")?;
                let error: Option<String> = row.try_get("first_error")?;
                Some(dead_shards_message(dead, first, error.as_deref()))
            } else {
                error_threshold_exceeded(&job, error_rows as u64)
            };
            if failure.is_none() && row.try_get::<bool, _>("unmerged")? {
                // Its merge work is still to be queued (`loops.rs: plan_merges`).
                continue;
            }
            let n = match failure {
                Some(message) => sqlx::query(
                    "UPDATE jobs SET state = 'failed', error = $1, finished_at_ms = ns_now_ms() \
                     WHERE id = $2 AND state = 'running'",
                )
                .bind(message)
                .bind(job.id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
                None => sqlx::query(
                    "UPDATE jobs SET state = 'finalizing' WHERE id = $1 AND state = 'running'",
                )
                .bind(job.id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
            };
            settled += n;
        }
        Ok(settled)
    }

    /// Takes the finalizing job whose last claim is oldest (never-claimed ones first) that no
    /// live finalizer holds and that waits out no backoff. SKIP LOCKED keeps a racing replica
    /// off it, and the locked row is re-checked, so a claim just committed is seen.
    pub(super) async fn take_finalize(
        &self,
        owner: &str,
        ttl_ms: i64,
    ) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "UPDATE jobs SET finalizer_owner = $1, finalizer_expires_at_ms = ns_now_ms() + $2 \
             WHERE id = ( \
               SELECT id FROM jobs WHERE state = 'finalizing' \
                 AND (finalizer_expires_at_ms IS NULL OR finalizer_expires_at_ms < ns_now_ms()) \
               ORDER BY finalizer_expires_at_ms NULLS FIRST, id LIMIT 1 \
               FOR UPDATE SKIP LOCKED) \
             RETURNING ",
            job_cols!()
        ))
        .bind(owner)
        .bind(ttl_ms)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Only the finalizer that holds the job may end it.
    pub(super) async fn finish_job(
        &self,
        job_id: i64,
        owner: &str,
        outcome: JobOutcome,
    ) -> Result<()> {
        let (state, error) = match outcome {
            JobOutcome::Succeeded => ("succeeded", None),
            JobOutcome::Failed(e) => ("failed", Some(e)),
        };
        let n = sqlx::query(
            "UPDATE jobs SET state = $1, error = $2, finished_at_ms = ns_now_ms(), \
             finalizer_owner = NULL, finalizer_expires_at_ms = NULL \
             WHERE id = $3 AND state = 'finalizing' AND finalizer_owner = $4",
        )
        .bind(state)
        .bind(error)
        .bind(job_id)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n > 0 {
            return Ok(());
        }
        let job = job_in(&self.pool, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        Err(StoreError::BadTransition {
            job_id,
            state: job.state,
            action: "finish",
        })
    }
}
