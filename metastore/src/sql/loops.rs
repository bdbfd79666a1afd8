//! What the background loops ask of the store: reaping, settling, finalizing, merge work and
//! metrics. Each is safe when several replicas run it at once: rows are taken with
//! `{skip_locked}`, and every transition is guarded by the state it leaves.

use async_trait::async_trait;
use nightshift_proto::{JobState, ShardState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Conn, Dialect, RowOf, SqlStore, Value};
use crate::Loops;
use crate::merges::{FileCounts, FileNumbers, MergeCandidate, MergeGroup, number_files};
use crate::records::StoreMetrics;
use crate::rules::{self, ShardKind};
use crate::{JobOutcome, JobRecord, LeaseTiming, PartRow, Result, StoreError};

/// Expired leases one reaper statement takes; the reaper goes on while batches come back full.
const REAP_BATCH: i64 = 1000;
/// Batches in one `reap_expired` call, so one call stays bounded.
const REAP_MAX_BATCHES: u32 = 100;
/// The error an expired lease leaves on its shard.
const EXPIRED: &str = "lease expired: worker presumed dead";

/// A running job with no open shards, as settling reads it.
#[derive(sqlx::FromRow)]
struct Settling {
    #[sqlx(flatten)]
    job: JobRecord,
    dead: i64,
    error_rows: i64,
    first_dead: Option<i64>,
    first_error: Option<String>,
    unmerged: bool,
}

#[async_trait]
impl<D: Dialect> Loops for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// Expired leases go back to pending after a backoff, or dead past max attempts.
    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64> {
        let sql = format!(
            "UPDATE shards AS s SET {} FROM jobs AS j \
             WHERE j.id = s.job_id AND s.state = $6 AND s.lease_expires_at_ms < {{now}} \
               AND s.id IN (SELECT id FROM shards WHERE state = $6 \
                 AND lease_expires_at_ms < {{now}} ORDER BY id LIMIT $7{{skip_locked}})",
            rules::end_grant_sql(timing)
        );
        let mut conn = self.conn().await?;
        let mut total = 0;
        for _ in 0..REAP_MAX_BATCHES {
            let reaped = sqlx::query(D::sql(&sql))
                .bind(false)
                .bind(ShardState::Dead.as_str())
                .bind(ShardState::Pending.as_str())
                .bind(EXPIRED)
                .bind(nightshift_proto::FailureClass::Retryable.as_str())
                .bind(ShardState::Leased.as_str())
                .bind(REAP_BATCH)
                .execute(D::ex(&mut conn))
                .await?;
            let n = D::affected(&reaped);
            total += n;
            if n < REAP_BATCH as u64 {
                break;
            }
        }
        Ok(total)
    }

    /// Running jobs with no pending or leased shard move on. A shard cannot reopen while its
    /// job runs, so deciding first and updating under a `running` guard is safe; of two
    /// replicas settling the same job, one update wins and only it is counted.
    async fn settle_jobs(&self) -> Result<u64> {
        let mut conn = self.conn().await?;
        // Jobs without shards count too: with nothing to run they have nothing to wait for.
        let jobs: Vec<Settling> = sqlx::query_as(D::sql(
            "SELECT {job}, \
               (SELECT COUNT(*) FROM shards s WHERE s.job_id = jobs.id AND s.state = $1) AS dead, \
               (SELECT CAST(COALESCE(SUM(s.error_rows), 0) AS BIGINT) FROM shards s \
                 WHERE s.job_id = jobs.id AND s.kind = $2) AS error_rows, \
               (SELECT s.id FROM shards s WHERE s.job_id = jobs.id AND s.state = $1 \
                 ORDER BY s.id LIMIT 1) AS first_dead, \
               (SELECT s.error FROM shards s WHERE s.job_id = jobs.id AND s.state = $1 \
                 ORDER BY s.id LIMIT 1) AS first_error, \
               EXISTS (SELECT 1 FROM shards r WHERE r.job_id = jobs.id AND r.kind = $2 \
                 AND r.id > COALESCE((SELECT MAX(m.merge_last) FROM shards m \
                   WHERE m.job_id = jobs.id AND m.kind = $3), 0)) AS unmerged \
             FROM jobs WHERE state = $4 AND NOT planning AND NOT EXISTS (SELECT 1 FROM shards s \
               WHERE s.job_id = jobs.id AND (s.state IN ($5, $6) OR s.kind = $7)) \
             ORDER BY id",
        ))
        .bind(ShardState::Dead.as_str())
        .bind(ShardKind::Rows.as_str())
        .bind(ShardKind::Merge.as_str())
        .bind(JobState::Running.as_str())
        .bind(ShardState::Pending.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(ShardKind::Copy.as_str())
        .fetch_all(D::ex(&mut conn))
        .await?;
        let mut settled = 0;
        for s in jobs {
            let failure = match s.first_dead {
                Some(first) if s.dead > 0 => Some(rules::dead_shards_message(
                    s.dead,
                    first,
                    s.first_error.as_deref(),
                )),
                // Checkpoints fail a job when its poison rows pass the threshold; this catches
                // a job that comes back (retry) with them already past it.
                _ => rules::error_threshold_exceeded(&s.job, s.error_rows.max(0) as u64),
            };
            settled += match failure {
                Some(message) => Self::fail_running_job(&mut conn, s.job.id, &message).await?,
                // Its merge work is still to be queued (the coordinator's merge planner).
                None if s.unmerged => 0,
                None => {
                    let moved =
                        sqlx::query("UPDATE jobs SET state = $1 WHERE id = $2 AND state = $3")
                            .bind(JobState::Finalizing.as_str())
                            .bind(s.job.id)
                            .bind(JobState::Running.as_str())
                            .execute(D::ex(&mut conn))
                            .await?;
                    D::affected(&moved)
                }
            };
        }
        Ok(settled)
    }

    /// Takes the finalizing job whose last claim is oldest (never-claimed ones first) that no
    /// live finalizer holds and that waits out no backoff.
    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>> {
        Ok(sqlx::query_as(D::sql(
            "UPDATE jobs SET finalizer_owner = $1, finalizer_expires_at_ms = {now} + $2 \
             WHERE id = (SELECT id FROM jobs WHERE state = $3 \
                 AND (finalizer_expires_at_ms IS NULL OR finalizer_expires_at_ms < {now}) \
               ORDER BY finalizer_expires_at_ms NULLS FIRST, id LIMIT 1{skip_locked}) \
             RETURNING {job}",
        ))
        .bind(owner)
        .bind(ttl_ms)
        .bind(JobState::Finalizing.as_str())
        .fetch_optional(D::ex(&mut *self.conn().await?))
        .await?)
    }

    async fn extend_finalize(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool> {
        let extended = sqlx::query(D::sql(
            "UPDATE jobs SET finalizer_expires_at_ms = {now} + $3 \
             WHERE id = $1 AND finalizer_owner = $2 AND state = $4",
        ))
        .bind(job_id)
        .bind(owner)
        .bind(ttl_ms)
        .bind(JobState::Finalizing.as_str())
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(D::affected(&extended) > 0)
    }

    /// Only the finalizer that holds the job may end it.
    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()> {
        let (state, error) = match outcome {
            JobOutcome::Succeeded => (JobState::Succeeded, None),
            JobOutcome::Failed(e) => (JobState::Failed, Some(e)),
        };
        let mut conn = self.conn().await?;
        // A succeeded job's parts and open uploads are garbage from now on, until collected.
        let ended = sqlx::query(D::sql(
            "UPDATE jobs SET state = $1, error = $2, finished_at_ms = {now}, \
             finalizer_owner = NULL, finalizer_expires_at_ms = NULL, garbage_pending = ($1 = $6) \
             WHERE id = $3 AND state = $5 AND finalizer_owner = $4",
        ))
        .bind(state.as_str())
        .bind(error.as_deref())
        .bind(job_id)
        .bind(owner)
        .bind(JobState::Finalizing.as_str())
        .bind(JobState::Succeeded.as_str())
        .execute(D::ex(&mut conn))
        .await?;
        if D::affected(&ended) > 0 {
            return Ok(());
        }
        let job = Self::job_in(&mut conn, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        Err(StoreError::BadTransition {
            job_id,
            state: job.state,
            action: "finish",
        })
    }

    /// Row shards after the last one a merge covers (merges are made in row order), up to and
    /// with the first that is not done: the merge rule looks no further, so a pass reads the
    /// run of finished shards waiting for a merge, not the whole job. (Two statements: the
    /// bounds first, so the second is a plain range over the primary key.)
    async fn merge_candidates(&self, job_id: i64) -> Result<Vec<MergeCandidate>> {
        let mut conn = self.conn().await?;
        let (after, upto): (i64, Option<i64>) = sqlx::query_as(
            "SELECT a.after, (SELECT MIN(o.id) FROM shards o WHERE o.job_id = $1 \
               AND o.kind = $2 AND o.id > a.after AND o.state <> $3) \
             FROM (SELECT COALESCE((SELECT MAX(m.merge_last) FROM shards m \
               WHERE m.job_id = $1 AND m.kind = $4), 0) AS after) a",
        )
        .bind(job_id)
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Done.as_str())
        .bind(ShardKind::Merge.as_str())
        .fetch_one(D::ex(&mut conn))
        .await?;
        Ok(sqlx::query_as(
            "SELECT s.id, s.state = $3 AS done, \
               (SELECT CAST(COALESCE(SUM(p.bytes + p.error_bytes), 0) AS BIGINT) FROM parts p \
                 WHERE p.shard_id = s.id) AS bytes \
             FROM shards s WHERE s.job_id = $1 AND s.kind = $2 AND s.id > $4 AND s.id <= $5 \
             ORDER BY s.id",
        )
        .bind(job_id)
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Done.as_str())
        .bind(after)
        .bind(upto.unwrap_or(i64::MAX))
        .fetch_all(D::ex(&mut conn))
        .await?)
    }

    /// Merge work for `groups` of a running job, once per first shard whichever replica
    /// plans it, each numbering its files after the merge before it (`merges::number_files`).
    async fn create_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64> {
        let mut conn = self.conn().await?;
        let mut made = 0;
        for g in groups {
            let n = Self::number_merge(&mut conn, job_id, g).await?;
            let created = sqlx::query(
                "INSERT INTO shards (job_id, kind, merge_first, merge_last, file_index, \
                   row_group_start, row_group_end, file_row_start, rows, output_file, \
                   error_file, output_files, error_files) \
                 SELECT $1, $4, $2, $3, MIN(file_index), 0, 0, 0, SUM(rows), $7, $8, $9, $10 \
                 FROM shards \
                 WHERE job_id = $1 AND kind = $5 AND id BETWEEN $2 AND $3 \
                   AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state = $6) \
                 HAVING COUNT(*) > 0 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(job_id)
            .bind(g.first)
            .bind(g.last)
            .bind(ShardKind::Merge.as_str())
            .bind(ShardKind::Rows.as_str())
            .bind(JobState::Running.as_str())
            .bind(n.output_file)
            .bind(n.error_file)
            .bind(n.after.output_files)
            .bind(n.after.error_files)
            .execute(D::ex(&mut conn))
            .await?;
            if D::affected(&created) == 0 {
                // Made already, or the job is not running now: a group after it would leave
                // a gap no later pass fills (candidates start after the last merge).
                break;
            }
            made += 1;
        }
        Ok(made)
    }

    /// The parts merge work wrote: the job's output files, in row order.
    async fn merged_parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        Ok(sqlx::query_as(D::sql(
            "SELECT {part} FROM parts p JOIN shards s ON s.id = p.shard_id \
             WHERE s.job_id = $1 AND s.kind = $2 ORDER BY s.merge_first, p.row_start",
        ))
        .bind(job_id)
        .bind(ShardKind::Merge.as_str())
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?)
    }

    async fn garbage_pending(&self, age_ms: i64, limit: u32) -> Result<Vec<JobRecord>> {
        let sql = D::sql(
            "SELECT {job} FROM jobs WHERE garbage_pending AND state = $1 \
               AND finished_at_ms <= {now} - $2 ORDER BY id LIMIT $3",
        );
        Ok(sqlx::query_as(sql)
            .bind(JobState::Succeeded.as_str())
            .bind(age_ms)
            .bind(i64::from(limit))
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn garbage_collected(&self, job_id: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET garbage_pending = FALSE WHERE id = $1")
            .bind(job_id)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(())
    }

    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics> {
        Ok(sqlx::query_as(D::sql(
            "SELECT \
               (SELECT COUNT(*) FROM shards s JOIN jobs j ON j.id = s.job_id \
                  WHERE s.state = $1 AND j.state = $2 AND s.kind = $3) AS pending, \
               (SELECT CAST(COALESCE(SUM(s.rows - s.checkpoint_rows), 0) AS BIGINT) \
                  FROM shards s JOIN jobs j ON j.id = s.job_id \
                  WHERE s.state = $1 AND j.state = $2 AND s.kind = $3) AS pending_rows, \
               (SELECT COUNT(*) FROM shards WHERE state = $4) AS leased, \
               (SELECT COUNT(*) FROM jobs WHERE state = $2) AS running, \
               (SELECT COUNT(*) FROM workers WHERE last_seen_ms > {now} - $5) AS workers, \
               (SELECT COUNT(*) FROM shards WHERE state = $4 AND kind = $6) AS copies",
        ))
        .bind(ShardState::Pending.as_str())
        .bind(JobState::Running.as_str())
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(workers_window_ms)
        .bind(ShardKind::Copy.as_str())
        .fetch_one(D::ex(&mut *self.conn().await?))
        .await?)
    }

    /// For a database no other process uses: every claim still marked held expires now.
    async fn recover_after_crash(&self) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET finalizer_expires_at_ms = 0 WHERE finalizer_owner IS NOT NULL",
        )
        .execute(D::ex(&mut tx))
        .await?;
        sqlx::query("UPDATE jobs SET planner_expires_at_ms = 0 WHERE planner_owner IS NOT NULL")
            .execute(D::ex(&mut tx))
            .await?;
        let freed = sqlx::query("UPDATE shards SET lease_expires_at_ms = 0 WHERE state = $1")
            .bind(ShardState::Leased.as_str())
            .execute(D::ex(&mut tx))
            .await?;
        tx.commit().await?;
        Ok(D::affected(&freed))
    }
}

impl<D: Dialect> SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// The indexes of the files merge work for `g` writes, after the merge before it.
    async fn number_merge(conn: &mut Conn<D>, job_id: i64, g: &MergeGroup) -> Result<FileNumbers> {
        let before: FileCounts = sqlx::query_as(
            "SELECT output_files, error_files FROM shards \
             WHERE job_id = $1 AND kind = $2 AND merge_first < $3 \
             ORDER BY merge_first DESC LIMIT 1",
        )
        .bind(job_id)
        .bind(ShardKind::Merge.as_str())
        .bind(g.first)
        .fetch_optional(D::ex(&mut *conn))
        .await?
        .unwrap_or(FileCounts::NONE_YET);
        let (output_rows, error_rows): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(p.rows - p.error_rows), 0) AS BIGINT), \
               CAST(COALESCE(SUM(p.error_rows), 0) AS BIGINT) \
             FROM parts p JOIN shards s ON s.id = p.shard_id \
             WHERE s.job_id = $1 AND s.kind = $2 AND s.id BETWEEN $3 AND $4",
        )
        .bind(job_id)
        .bind(ShardKind::Rows.as_str())
        .bind(g.first)
        .bind(g.last)
        .fetch_one(D::ex(conn))
        .await?;
        let count = |n: i64| n.max(0) as u64;
        Ok(number_files(before, count(output_rows), count(error_rows)))
    }
}
