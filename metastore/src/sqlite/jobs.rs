//! Jobs on SQLite: creation (idempotent per key), reads, cancel, retry, delete.

use nightshift_proto::JobState;
use nightshift_proto::wire::InputFile;

use super::{SqliteStore, job_from_row};
use crate::records::{DialectRow, SHARD_COLUMNS, ShardTally};
use crate::{JobRecord, NewJob, Result, ShardRow, StoreError, Submitted, output_key};

/// The first job, other than `except`, that is not cancelled and owns an output overlapping
/// `uri`'s (see `output_key`), as the refusal to give. SQLite has one writer, so the check and
/// the insert in one transaction cannot interleave with another submission's.
async fn output_conflict(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    uri: &str,
    except: i64,
) -> Result<Option<StoreError>> {
    let key = output_key(uri);
    let row = sqlx::query(
        "SELECT id, name, output_uri FROM jobs \
         WHERE state <> 'cancelled' AND id <> ? \
           AND (substr(?, 1, length(output_key)) = output_key \
                OR substr(output_key, 1, length(?)) = ?) \
         ORDER BY id LIMIT 1",
    )
    .bind(except)
    .bind(&key)
    .bind(&key)
    .bind(&key)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| r.output_taken(uri)).transpose()
}

pub(super) async fn create_job(s: &SqliteStore, job: NewJob) -> Result<Submitted> {
    let mut tx = s.pool.begin().await?;
    let hash = job.spec.hash();
    if let Some(key) = &job.idempotency_key {
        let existing = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE idempotency_key = ?"
        ))
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let existing = job_from_row(&row)?;
            if existing.spec_hash == hash {
                return Ok(Submitted::Existing(existing));
            }
            return Err(StoreError::IdempotencyConflict {
                key: key.clone(),
                job_id: existing.id,
            });
        }
    }
    if let Some(taken) = output_conflict(&mut tx, &job.spec.output.uri, 0).await? {
        return Err(taken);
    }
    let now = SqliteStore::now(&mut tx).await?;
    let spec_json = serde_json::to_string(&job.spec)
        .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (uid, name, idempotency_key, spec_json, spec_hash, state, priority, \
         max_attempts, rows_total, output_uri, output_key, created_at_ms, started_at_ms) \
         VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(&job.uid)
    .bind(&job.spec.name)
    .bind(&job.idempotency_key)
    .bind(spec_json)
    .bind(&hash)
    .bind(job.spec.priority as i64)
    .bind(job.spec.retry.max_attempts as i64)
    .bind(job.plan.rows_total as i64)
    .bind(&job.spec.output.uri)
    .bind(output_key(&job.spec.output.uri))
    .bind(now)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    for (idx, f) in job.plan.files.iter().enumerate() {
        sqlx::query(
            "INSERT INTO input_files (job_id, idx, uri, size, etag) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(idx as i64)
        .bind(&f.uri)
        .bind(f.size as i64)
        .bind(&f.etag)
        .execute(&mut *tx)
        .await?;
    }
    for s in &job.plan.shards {
        sqlx::query(
            "INSERT INTO shards (job_id, file_index, row_group_start, row_group_end, \
             file_row_start, rows) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(s.file_index as i64)
        .bind(s.row_group_start as i64)
        .bind(s.row_group_end as i64)
        .bind(s.file_row_start as i64)
        .bind(s.rows as i64)
        .execute(&mut *tx)
        .await?;
    }
    let record = SqliteStore::job_in(&mut tx, id)
        .await?
        .ok_or(StoreError::JobNotFound(id))?;
    tx.commit().await?;
    Ok(Submitted::Created(record))
}

pub(super) async fn job_by_key(s: &SqliteStore, key: &str) -> Result<Option<JobRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs WHERE idempotency_key = ?"
    ))
    .bind(key)
    .fetch_optional(&s.pool)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

pub(super) async fn job(s: &SqliteStore, id: i64) -> Result<Option<JobRecord>> {
    let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ?"))
        .bind(id)
        .fetch_optional(&s.pool)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

pub(super) async fn job_by_name(s: &SqliteStore, name: &str) -> Result<Option<JobRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1"
    ))
    .bind(name)
    .fetch_optional(&s.pool)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

pub(super) async fn list_jobs(s: &SqliteStore, limit: u32) -> Result<Vec<JobRecord>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        job_cols!(),
        " FROM jobs ORDER BY id DESC LIMIT ?"
    ))
    .bind(limit as i64)
    .fetch_all(&s.pool)
    .await?;
    rows.iter().map(job_from_row).collect()
}

pub(super) async fn shard_counts(s: &SqliteStore, job_id: i64) -> Result<ShardTally> {
    let rows = sqlx::query(
        "SELECT state, COUNT(*) AS n, COALESCE(SUM(checkpoint_rows), 0) AS done, \
         COALESCE(SUM(error_rows), 0) AS errors FROM shards WHERE job_id = ? AND kind = 'rows' \
         GROUP BY state",
    )
    .bind(job_id)
    .fetch_all(&s.pool)
    .await?;
    let mut tally = ShardTally::default();
    for row in &rows {
        row.shard_tally(&mut tally)?;
    }
    Ok(tally)
}

pub(super) async fn shards(s: &SqliteStore, job_id: i64) -> Result<Vec<ShardRow>> {
    let sql = format!(
        "SELECT {SHARD_COLUMNS} FROM shards WHERE job_id = ? AND kind = 'rows' ORDER BY id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .fetch_all(&s.pool)
        .await?;
    rows.iter().map(|r| r.shard_row()).collect()
}

pub(super) async fn input_files(s: &SqliteStore, job_id: i64) -> Result<Vec<InputFile>> {
    let rows = sqlx::query("SELECT uri, size, etag FROM input_files WHERE job_id = ? ORDER BY idx")
        .bind(job_id)
        .fetch_all(&s.pool)
        .await?;
    rows.iter().map(|r| r.input_file()).collect()
}

pub(super) async fn cancel_job(s: &SqliteStore, id: i64) -> Result<JobRecord> {
    let mut tx = s.pool.begin().await?;
    let job = SqliteStore::job_in(&mut tx, id)
        .await?
        .ok_or(StoreError::JobNotFound(id))?;
    match job.state {
        JobState::Cancelled => return Ok(job),
        JobState::Pending | JobState::Planning | JobState::Running | JobState::Finalizing => {}
        state => {
            return Err(StoreError::BadTransition {
                job_id: id,
                state,
                action: "cancel",
            });
        }
    }
    let now = SqliteStore::now(&mut tx).await?;
    sqlx::query(
        "UPDATE jobs SET state = 'cancelled', finished_at_ms = ?, finalizer_owner = NULL, \
         finalizer_expires_at_ms = NULL WHERE id = ?",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let job = SqliteStore::job_in(&mut tx, id)
        .await?
        .ok_or(StoreError::JobNotFound(id))?;
    tx.commit().await?;
    Ok(job)
}

pub(super) async fn retry_job(s: &SqliteStore, id: i64) -> Result<JobRecord> {
    let mut tx = s.pool.begin().await?;
    let job = SqliteStore::job_in(&mut tx, id)
        .await?
        .ok_or(StoreError::JobNotFound(id))?;
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Err(StoreError::BadTransition {
            job_id: id,
            state: job.state,
            action: "retry",
        });
    }
    if job.state == JobState::Cancelled
        && let Some(taken) = output_conflict(&mut tx, &job.output_uri, id).await?
    {
        return Err(taken);
    }
    sqlx::query(
        "UPDATE shards SET state = 'pending', attempts = 0, not_before_ms = 0, error = NULL, \
         error_class = NULL WHERE job_id = ? AND state = 'dead'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE jobs SET state = 'running', error = NULL, finished_at_ms = NULL, \
         finalizer_owner = NULL, finalizer_expires_at_ms = NULL WHERE id = ?",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let job = SqliteStore::job_in(&mut tx, id)
        .await?
        .ok_or(StoreError::JobNotFound(id))?;
    tx.commit().await?;
    Ok(job)
}

pub(super) async fn delete_job(s: &SqliteStore, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM jobs WHERE id = ?")
        .bind(id)
        .execute(&s.pool)
        .await?;
    Ok(())
}
