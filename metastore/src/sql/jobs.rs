//! Jobs: submission (idempotent, one owner per output), reads, cancel, retry and delete.

use async_trait::async_trait;
use nightshift_proto::wire::InputFile;
use nightshift_proto::{JobState, ShardState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Conn, Dialect, RowOf, SqlStore, Value};
use crate::Jobs;
use crate::records::{FileRow, ShardTally, StateTally, stored_state, tally};
use crate::rules::{self, CANCELLABLE, ShardKind};
use crate::{
    JobFilter, JobRecord, NewJob, PartRow, PlanPiece, Result, ShardRow, StoreError, Submitted,
    output_key,
};

/// Rounds of a submission whose idempotency key another one inserted under it and removed.
const KEY_RACE_TRIES: usize = 3;

/// A job's output overlaps the output `$1` (an `output_key`): one is a prefix of the other.
const OVERLAPS: &str = "(substr($1, 1, length(output_key)) = output_key \
     OR substr(output_key, 1, length($1)) = $1)";

/// The job that owns an output another one overlaps.
#[derive(sqlx::FromRow)]
struct OwnerRow {
    id: i64,
    name: String,
    output_uri: String,
}

/// What an idempotency key that already names `existing` means for a submission of `hash`.
fn same_key(existing: JobRecord, key: &str, hash: &str) -> Result<Submitted> {
    if existing.spec_hash == hash {
        Ok(Submitted::Existing(existing))
    } else {
        Err(StoreError::IdempotencyConflict {
            key: key.to_owned(),
            job_id: existing.id,
        })
    }
}

#[async_trait]
impl<D: Dialect> Jobs for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// Inserts a job with its input files and shards in one transaction, under the output
    /// lock: a racing submission of the same key has committed or not begun, so the key and
    /// the output are judged on what is there.
    async fn create_job(&self, job: NewJob) -> Result<Submitted> {
        let hash = job.spec.hash();
        let spec_json = serde_json::to_string(&job.spec)
            .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
        for _ in 0..KEY_RACE_TRIES {
            let mut tx = self.pool.begin().await?;
            D::lock_outputs(&mut tx).await?;
            if let Some(key) = &job.idempotency_key
                && let Some(existing) = Self::job_by_key_in(&mut tx, key).await?
            {
                return same_key(existing, key, &hash);
            }
            if let Some(taken) = Self::output_conflict(&mut tx, &job.spec.output.uri, 0).await? {
                return Err(taken);
            }
            // Only the idempotency key can make the insert do nothing: look again.
            let Some(id) = Self::insert_job(&mut tx, &job, &spec_json, &hash).await? else {
                continue;
            };
            D::insert_plan(&mut tx, id, &job.plan, 0).await?;
            Self::insert_notification(&mut tx, id, &job.spec).await?;
            let record = Self::job_in(&mut tx, id).await?;
            tx.commit().await?;
            D::after_create(self, job.plan.shards.len()).await;
            return Ok(Submitted::Created(
                record.ok_or(StoreError::JobNotFound(id))?,
            ));
        }
        Err(StoreError::Corrupt(format!(
            "idempotency key {:?} kept changing hands during submission",
            job.idempotency_key
        )))
    }

    /// Fails a job whose background planning found a problem; it stays `planning`, so that a
    /// retry plans on from where it stopped.
    async fn fail_planning(&self, job_id: i64, message: &str) -> Result<()> {
        sqlx::query(D::sql(
            "UPDATE jobs SET state = $2, error = $3, finished_at_ms = {now} \
             WHERE id = $1 AND planning AND state IN ($4, $5)",
        ))
        .bind(job_id)
        .bind(JobState::Failed.as_str())
        .bind(message)
        .bind(JobState::Running.as_str())
        .bind(JobState::Queued.as_str())
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(())
    }

    /// Jobs still being planned that have not ended.
    async fn planning_jobs(&self) -> Result<Vec<JobRecord>> {
        let sql = D::sql("SELECT {job} FROM jobs WHERE planning AND state IN ($1, $2) ORDER BY id");
        Ok(sqlx::query_as(sql)
            .bind(JobState::Running.as_str())
            .bind(JobState::Queued.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn claim_planning(&self, job_id: i64, owner: &str, ttl_ms: i64) -> Result<bool> {
        let claimed = sqlx::query(D::sql(
            "UPDATE jobs SET planner_owner = $2, planner_expires_at_ms = {now} + $3 \
             WHERE id = $1 AND planning AND state IN ($4, $5) AND (planner_owner IS NULL \
               OR planner_owner = $2 OR planner_expires_at_ms < {now})",
        ))
        .bind(job_id)
        .bind(owner)
        .bind(ttl_ms)
        .bind(JobState::Running.as_str())
        .bind(JobState::Queued.as_str())
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(D::affected(&claimed) > 0)
    }

    /// The cancelled jobs whose output overlaps `uri`'s, oldest first.
    async fn cancelled_at(&self, uri: &str) -> Result<Vec<JobRecord>> {
        let sql = D::sql(&format!(
            "SELECT {{job}} FROM jobs WHERE state = $2 AND {OVERLAPS} ORDER BY id"
        ));
        Ok(sqlx::query_as(sql)
            .bind(output_key(uri))
            .bind(JobState::Cancelled.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>> {
        let sql = D::sql("SELECT {job} FROM jobs WHERE name = $1 ORDER BY id DESC LIMIT 1");
        Ok(sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(D::ex(&mut *self.conn().await?))
            .await?)
    }

    /// Jobs that pass `filter`, newest first; a state is the one a user sees (`shown_state`).
    /// Prefixes are compared as text, not as patterns.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>> {
        let sql = D::sql(
            "SELECT {job} FROM jobs WHERE id < $2 \
               AND ($3 IS NULL OR (state = $3 AND ($6 IS NULL OR planning = ($6 = 1)))) \
               AND ($4 IS NULL OR substr(name, 1, length($4)) = $4) \
               AND ($5 IS NULL OR substr(idempotency_key, 1, length($5)) = $5) \
             ORDER BY id DESC LIMIT $1",
        );
        let schedule = filter.schedule.as_deref().map(crate::schedule_key_prefix);
        let (state, planning) = filter.state.map(stored_state).unzip();
        Ok(sqlx::query_as(sql)
            .bind(i64::from(filter.limit))
            .bind(filter.before_id.unwrap_or(i64::MAX))
            .bind(state.map(JobState::as_str))
            .bind(filter.name_prefix.as_deref())
            .bind(schedule.as_deref())
            .bind(planning.flatten().map(i64::from))
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    /// Running jobs, oldest first.
    async fn running_jobs(&self) -> Result<Vec<JobRecord>> {
        let sql = D::sql("SELECT {job} FROM jobs WHERE state = $1 ORDER BY id");
        Ok(sqlx::query_as(sql)
            .bind(JobState::Running.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn shard_counts(&self, job_id: i64) -> Result<ShardTally> {
        let rows: Vec<StateTally> = sqlx::query_as(
            "SELECT state, kind = $3 AS copies, COUNT(*) AS n, \
             CAST(COALESCE(SUM(checkpoint_rows), 0) AS BIGINT) AS done, \
             CAST(COALESCE(SUM(error_rows), 0) AS BIGINT) AS errors \
             FROM shards WHERE job_id = $1 AND kind IN ($2, $3) GROUP BY state, kind",
        )
        .bind(job_id)
        .bind(ShardKind::Rows.as_str())
        .bind(ShardKind::Copy.as_str())
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(tally(rows))
    }

    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        let sql = D::sql("SELECT {shard} FROM shards WHERE job_id = $1 AND kind = $2 ORDER BY id");
        Ok(sqlx::query_as(sql)
            .bind(job_id)
            .bind(ShardKind::Rows.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>> {
        let rows: Vec<FileRow> = sqlx::query_as(
            "SELECT uri, size, etag FROM input_files WHERE job_id = $1 ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(rows.into_iter().map(InputFile::from).collect())
    }

    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        let sql = D::sql(
            "SELECT {part} FROM parts p WHERE p.job_id = $1 ORDER BY p.shard_id, p.row_start",
        );
        Ok(sqlx::query_as(sql)
            .bind(job_id)
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    /// One guarded statement; a job already cancelled answers as it is.
    async fn cancel_job(&self, id: i64) -> Result<JobRecord> {
        let mut conn = self.conn().await?;
        let sql = D::sql(
            "UPDATE jobs SET state = $2, finished_at_ms = {now}, finalizer_owner = NULL, \
             finalizer_expires_at_ms = NULL \
             WHERE id = $1 AND state IN ($3, $4, $5, $6, $7) RETURNING {job}",
        );
        let mut query = sqlx::query_as(sql)
            .bind(id)
            .bind(JobState::Cancelled.as_str());
        for state in CANCELLABLE {
            query = query.bind(state.as_str());
        }
        if let Some(job) = query.fetch_optional(D::ex(&mut conn)).await? {
            return Ok(job);
        }
        let job = Self::job_in(&mut conn, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        match job.state {
            JobState::Cancelled => Ok(job),
            state => Err(StoreError::BadTransition {
                job_id: id,
                state,
                action: "cancel",
            }),
        }
    }

    async fn files_removed(&self, job_ids: &[i64]) -> Result<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        let mut marked = Vec::new();
        for id in job_ids {
            let sql = D::sql(
                "UPDATE jobs SET files_removed_at_ms = COALESCE(files_removed_at_ms, {now}) \
                 WHERE id = $1 AND state = $2 RETURNING id",
            );
            let row: Option<i64> = sqlx::query_scalar(sql)
                .bind(id)
                .bind(JobState::Cancelled.as_str())
                .fetch_optional(D::ex(&mut tx))
                .await?;
            marked.extend(row);
        }
        tx.commit().await?;
        Ok(marked)
    }

    /// Starts queued jobs, by priority then submission, until `max_running` run; answers
    /// their ids in id order. Under the output lock, so replicas doing it at once cannot pass the limit.
    async fn start_queued(&self, max_running: u32) -> Result<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        D::lock_outputs(&mut tx).await?;
        let mut started: Vec<i64> = sqlx::query_scalar(D::sql(
            "UPDATE jobs SET state = $2, started_at_ms = {now} \
             WHERE id IN (SELECT id FROM jobs WHERE state = $3 ORDER BY priority DESC, id \
               LIMIT (SELECT CASE WHEN COUNT(*) < $1 THEN $1 - COUNT(*) ELSE 0 END \
                      FROM jobs WHERE state = $2)) \
             RETURNING id",
        ))
        .bind(i64::from(max_running))
        .bind(JobState::Running.as_str())
        .bind(JobState::Queued.as_str())
        .fetch_all(D::ex(&mut tx))
        .await?;
        tx.commit().await?;
        started.sort_unstable();
        Ok(started)
    }

    /// Dead shards go back to pending with fresh attempts; checkpoints stay; a finalizer's
    /// claim is dropped. The job runs again, or waits `queued` for `start_queued`.
    async fn retry_job(&self, id: i64, queued: bool) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        let sql = D::sql("SELECT {job} FROM jobs WHERE id = $1{lock_row}");
        let job: JobRecord = sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(D::ex(&mut tx))
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        if let Some(refusal) = rules::retry_refusal(&job) {
            return Err(refusal);
        }
        if job.state == JobState::Cancelled {
            D::lock_outputs(&mut tx).await?;
            if let Some(taken) = Self::output_conflict(&mut tx, &job.output_uri, id).await? {
                return Err(taken);
            }
        }
        sqlx::query(
            "UPDATE shards SET state = $2, attempts = 0, not_before_ms = 0, error = NULL, \
             error_class = NULL WHERE job_id = $1 AND state = $3",
        )
        .bind(id)
        .bind(ShardState::Pending.as_str())
        .bind(ShardState::Dead.as_str())
        .execute(D::ex(&mut tx))
        .await?;
        Self::reset_notification(&mut tx, id).await?;
        let sql = D::sql(
            "UPDATE jobs SET state = $2, error = NULL, finished_at_ms = NULL, \
             finalizer_owner = NULL, finalizer_expires_at_ms = NULL WHERE id = $1 RETURNING {job}",
        );
        let state = if queued {
            JobState::Queued
        } else {
            JobState::Running
        };
        let job = sqlx::query_as(sql)
            .bind(id)
            .bind(state.as_str())
            .fetch_one(D::ex(&mut tx))
            .await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn delete_job(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(())
    }

    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET batch_rows = $1 WHERE uid = $2 AND batch_rows IS DISTINCT FROM $1",
        )
        .bind(count(rows))
        .bind(job_uid)
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(())
    }

    async fn note_output_schema(&self, job_uid: &str, schema: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET output_schema = $1 WHERE uid = $2 AND output_schema IS NULL")
            .bind(schema)
            .bind(job_uid)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(())
    }

    /// Records the next piece of a job planned in the background (see the trait).
    async fn append_plan(&self, job_id: i64, piece: &PlanPiece) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE jobs SET files_planned = files_planned + $2, rows_total = rows_total + $3, \
               files_listed = $4, planning = $5 \
             WHERE id = $1 AND planning AND files_planned = $6 AND state IN ($7, $8)",
        )
        .bind(job_id)
        .bind(count(piece.plan.files.len() as u64))
        .bind(count(piece.plan.rows_total))
        .bind(piece.listed.map(count))
        .bind(!piece.last)
        .bind(count(piece.after))
        .bind(JobState::Running.as_str())
        .bind(JobState::Queued.as_str())
        .execute(D::ex(&mut tx))
        .await?;
        if D::affected(&moved) == 0 {
            return Ok(false);
        }
        D::insert_plan(&mut tx, job_id, &piece.plan, piece.after).await?;
        tx.commit().await?;
        D::after_create(self, piece.plan.shards.len()).await;
        Ok(true)
    }

    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>> {
        Self::job_by_key_in(&mut *self.conn().await?, key).await
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        Self::job_in(&mut *self.conn().await?, id).await
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
    async fn insert_job(
        conn: &mut Conn<D>,
        job: &NewJob,
        spec_json: &str,
        hash: &str,
    ) -> Result<Option<i64>> {
        let sql = D::sql(
            "INSERT INTO jobs (uid, name, idempotency_key, spec_json, spec_hash, state, \
             priority, max_attempts, rows_total, output_uri, output_key, created_at_ms, \
             started_at_ms, planning, files_planned) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, t.now, \
               CASE WHEN $12 THEN NULL ELSE t.now END, $13, $14 \
             FROM (SELECT {now} AS now) t WHERE true \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        );
        Ok(sqlx::query_scalar(sql)
            .bind(job.uid.as_str())
            .bind(job.spec.name.as_str())
            .bind(job.idempotency_key.as_deref())
            .bind(spec_json)
            .bind(hash)
            .bind(
                if job.queued {
                    JobState::Queued
                } else {
                    JobState::Running
                }
                .as_str(),
            )
            .bind(i64::from(job.spec.priority))
            .bind(i64::from(job.spec.retry.max_attempts))
            .bind(count(job.plan.rows_total))
            .bind(job.spec.output.uri.as_str())
            .bind(output_key(&job.spec.output.uri))
            .bind(job.queued)
            .bind(job.planning)
            .bind(count(job.plan.files.len() as u64))
            .fetch_optional(D::ex(conn))
            .await?)
    }

    /// The first job, other than `except`, that is not cancelled and owns an output
    /// overlapping `uri`'s (see `output_key`), as the refusal to give. Call under the output
    /// lock.
    async fn output_conflict(
        conn: &mut Conn<D>,
        uri: &str,
        except: i64,
    ) -> Result<Option<StoreError>> {
        let owner: Option<OwnerRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, output_uri FROM jobs WHERE state <> $3 AND id <> $2 \
               AND {OVERLAPS} ORDER BY id LIMIT 1"
        )))
        .bind(output_key(uri))
        .bind(except)
        .bind(JobState::Cancelled.as_str())
        .fetch_optional(D::ex(conn))
        .await?;
        Ok(owner.map(|o| StoreError::OutputTaken {
            uri: uri.to_string(),
            job_id: o.id,
            job: o.name,
            owner_uri: o.output_uri,
        }))
    }

    pub(super) async fn job_in(conn: &mut Conn<D>, id: i64) -> Result<Option<JobRecord>> {
        let sql = D::sql("SELECT {job} FROM jobs WHERE id = $1");
        Ok(sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(D::ex(conn))
            .await?)
    }

    pub(super) async fn job_by_key_in(conn: &mut Conn<D>, key: &str) -> Result<Option<JobRecord>> {
        let sql = D::sql("SELECT {job} FROM jobs WHERE idempotency_key = $1");
        Ok(sqlx::query_as(sql)
            .bind(key)
            .fetch_optional(D::ex(conn))
            .await?)
    }
}

/// A count as BIGINT; past `i64::MAX` it saturates (and then fails the checks) rather than
/// wrapping negative.
pub(crate) fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
