//! The lease protocol on SQLite: claims and every write guarded by `(shard, token)`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use nightshift_proto::wire::{HeartbeatResponse, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use nightshift_proto::{FailureClass, JobState, LeaseState};
use sqlx::Row;

use super::{SqliteStore, parse_state};
use crate::records::DialectRow;
use crate::{JobRecord, LeaseHolder, LeaseTiming, Result, StoreError, new_lease_secret};

/// Running jobs by priority through `jobs_running`, each one's pending shards in id order
/// through `shards_job`: that nested loop yields the ORDER BY as is, so the LIMIT stops it
/// after `max` shards however many are pending.
pub(super) async fn claim(
    s: &SqliteStore,
    worker: &str,
    max: u32,
    timing: LeaseTiming,
) -> Result<Vec<ShardLease>> {
    let secret = new_lease_secret();
    let mut tx = s.pool.begin().await?;
    let now = SqliteStore::now(&mut tx).await?;
    sqlx::query(
        "INSERT INTO workers (id, last_seen_ms) VALUES (?, ?) \
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
    )
    .bind(worker)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query(
        "UPDATE shards SET state = 'leased', token = token + 1, attempts = attempts + 1, \
         worker_id = ?, lease_secret = ?, lease_expires_at_ms = ? \
         WHERE id IN (SELECT s.id FROM jobs j JOIN shards s ON s.job_id = j.id \
                      WHERE s.state = 'pending' AND j.state = 'running' AND s.not_before_ms <= ? \
                      ORDER BY j.priority DESC, j.id, s.id LIMIT ?) \
         RETURNING id, job_id, file_index, row_group_start, row_group_end, file_row_start, \
                   rows, token, attempts, checkpoint_rows, kind, merge_first, merge_last",
    )
    .bind(worker)
    .bind(secret.to_hex())
    .bind(now + timing.ttl_ms)
    .bind(now)
    .bind(max as i64)
    .fetch_all(&mut *tx)
    .await?;
    let mut jobs: HashMap<i64, JobRecord> = HashMap::new();
    let mut leases = Vec::with_capacity(rows.len());
    for r in rows {
        let job_id: i64 = r.try_get("job_id")?;
        let job = match jobs.entry(job_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(
                SqliteStore::job_in(&mut tx, job_id)
                    .await?
                    .ok_or(StoreError::JobNotFound(job_id))?,
            ),
        };
        let file_index: i64 = r.try_get("file_index")?;
        let f = sqlx::query("SELECT uri, size, etag FROM input_files WHERE job_id = ? AND idx = ?")
            .bind(job_id)
            .bind(file_index)
            .fetch_one(&mut *tx)
            .await?;
        leases.push(ShardLease {
            job_id,
            job_uid: job.uid.clone(),
            shard_id: r.try_get("id")?,
            token: r.try_get("token")?,
            secret,
            attempt: r.try_get::<i64, _>("attempts")? as u32,
            file: f.input_file()?,
            plan: r.shard_plan()?,
            checkpoint_rows: r.try_get::<i64, _>("checkpoint_rows")? as u64,
            spec: job.spec.clone(),
            merge: if r.try_get::<String, _>("kind")? == "merge" {
                let (first, last) = (r.try_get("merge_first")?, r.try_get("merge_last")?);
                Some(super::merges::sources(&mut *tx, job_id, first, last).await?)
            } else {
                None
            },
        });
    }
    tx.commit().await?;
    leases.sort_by_key(|l| l.shard_id);
    Ok(leases)
}

pub(super) async fn holders(s: &SqliteStore, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
    let mut holders = Vec::with_capacity(shard_ids.len());
    for &id in shard_ids {
        let row = sqlx::query(
            "SELECT s.id, s.token, s.worker_id, s.lease_secret, s.rows, j.uid, j.output_uri \
             FROM shards s JOIN jobs j ON j.id = s.job_id WHERE s.id = ? AND s.state = 'leased'",
        )
        .bind(id)
        .fetch_optional(&s.pool)
        .await?;
        if let Some(r) = row {
            holders.push(r.holder()?);
        }
    }
    Ok(holders)
}

pub(super) async fn heartbeat(
    s: &SqliteStore,
    worker: &str,
    leases: &[LeaseRef],
    timing: LeaseTiming,
) -> Result<HeartbeatResponse> {
    let mut tx = s.pool.begin().await?;
    let now = SqliteStore::now(&mut tx).await?;
    sqlx::query(
        "INSERT INTO workers (id, last_seen_ms) VALUES (?, ?) \
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
    )
    .bind(worker)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(leases.len());
    for l in leases {
        let row = sqlx::query(
            "SELECT s.state, s.token, j.state AS job_state FROM shards s \
             JOIN jobs j ON j.id = s.job_id WHERE s.id = ?",
        )
        .bind(l.shard_id)
        .fetch_optional(&mut *tx)
        .await?;
        let state = match row {
            Some(r)
                if r.try_get::<String, _>("state")? == "leased"
                    && r.try_get::<i64, _>("token")? == l.token =>
            {
                if r.try_get::<String, _>("job_state")? == "running" {
                    sqlx::query(
                        "UPDATE shards SET lease_expires_at_ms = ? WHERE id = ? AND token = ?",
                    )
                    .bind(now + timing.ttl_ms)
                    .bind(l.shard_id)
                    .bind(l.token)
                    .execute(&mut *tx)
                    .await?;
                    LeaseState::Held
                } else {
                    LeaseState::Cancelled
                }
            }
            _ => LeaseState::Lost,
        };
        out.push(LeaseStatus {
            shard_id: l.shard_id,
            token: l.token,
            state,
        });
    }
    tx.commit().await?;
    Ok(HeartbeatResponse { leases: out })
}

pub(super) async fn checkpoint(s: &SqliteStore, lease: LeaseRef, part: &PartRecord) -> Result<()> {
    let mut tx = s.pool.begin().await?;
    let row = sqlx::query(
        "SELECT s.job_id, s.checkpoint_rows, s.rows, j.state AS job_state FROM shards s \
         JOIN jobs j ON j.id = s.job_id WHERE s.id = ? AND s.token = ? AND s.state = 'leased'",
    )
    .bind(lease.shard_id)
    .bind(lease.token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::LeaseLost {
            shard_id: lease.shard_id,
            token: lease.token,
        });
    };
    let job_id: i64 = row.try_get("job_id")?;
    let job_state = parse_state::<JobState>(&row.try_get::<String, _>("job_state")?)?;
    if job_state != JobState::Running {
        return Err(StoreError::JobNotRunning {
            job_id,
            state: job_state,
        });
    }
    let done = row.try_get::<i64, _>("checkpoint_rows")? as u64;
    let rows = row.try_get::<i64, _>("rows")? as u64;
    if part.row_start != done || part.row_start.saturating_add(part.rows) > rows || part.rows == 0 {
        return Err(StoreError::CheckpointGap {
            shard_id: lease.shard_id,
            expected: done,
            got: part.row_start,
        });
    }
    sqlx::query(
        "UPDATE shards SET checkpoint_rows = checkpoint_rows + ?, error_rows = error_rows + ? \
         WHERE id = ? AND token = ?",
    )
    .bind(part.rows as i64)
    .bind(part.error_rows as i64)
    .bind(lease.shard_id)
    .bind(lease.token)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO parts (job_id, shard_id, token, row_start, rows, bytes, uri, error_rows, \
         error_uri, error_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(job_id)
    .bind(lease.shard_id)
    .bind(lease.token)
    .bind(part.row_start as i64)
    .bind(part.rows as i64)
    .bind(part.bytes as i64)
    .bind(&part.uri)
    .bind(part.error_rows as i64)
    .bind(&part.error_uri)
    .bind(part.error_bytes as i64)
    .execute(&mut *tx)
    .await?;
    if part.error_rows > 0 {
        let job = SqliteStore::job_in(&mut tx, job_id)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        let errors: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(error_rows), 0) FROM shards WHERE job_id = ? AND kind = 'rows'",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(message) = crate::records::error_threshold_exceeded(&job, errors as u64) {
            let now = SqliteStore::now(&mut tx).await?;
            sqlx::query(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at_ms = ? \
                 WHERE id = ? AND state = 'running'",
            )
            .bind(message)
            .bind(now)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn complete(s: &SqliteStore, lease: LeaseRef) -> Result<()> {
    let mut tx = s.pool.begin().await?;
    let done = sqlx::query(
        "UPDATE shards SET state = 'done', lease_expires_at_ms = NULL, worker_id = NULL \
         WHERE id = ? AND token = ? AND state = 'leased' AND checkpoint_rows = rows",
    )
    .bind(lease.shard_id)
    .bind(lease.token)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 0 {
        let e = SqliteStore::lease_error(&mut tx, lease).await?;
        // Finishing a shard of a job that was cancelled meanwhile is not an error for it.
        if !matches!(e, StoreError::JobNotRunning { .. }) {
            return Err(e);
        }
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn fail(
    s: &SqliteStore,
    lease: LeaseRef,
    class: FailureClass,
    message: &str,
    timing: LeaseTiming,
) -> Result<()> {
    let mut tx = s.pool.begin().await?;
    let row = sqlx::query(
        "SELECT s.attempts, j.max_attempts FROM shards s JOIN jobs j ON j.id = s.job_id \
         WHERE s.id = ? AND s.token = ? AND s.state = 'leased'",
    )
    .bind(lease.shard_id)
    .bind(lease.token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::LeaseLost {
            shard_id: lease.shard_id,
            token: lease.token,
        });
    };
    let attempts: i64 = row.try_get("attempts")?;
    let max: i64 = row.try_get("max_attempts")?;
    let dead = class == FailureClass::Permanent || attempts >= max;
    let now = SqliteStore::now(&mut tx).await?;
    sqlx::query(
        "UPDATE shards SET state = ?, not_before_ms = ?, worker_id = NULL, \
         lease_expires_at_ms = NULL, error = ?, error_class = ? \
         WHERE id = ? AND token = ? AND state = 'leased'",
    )
    .bind(if dead { "dead" } else { "pending" })
    .bind(now + timing.backoff_ms(attempts))
    .bind(message)
    .bind(class.as_str())
    .bind(lease.shard_id)
    .bind(lease.token)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn release(s: &SqliteStore, lease: LeaseRef) -> Result<()> {
    let n = sqlx::query(
        "UPDATE shards SET state = 'pending', attempts = MAX(attempts - 1, 0), \
         worker_id = NULL, lease_expires_at_ms = NULL, not_before_ms = 0 \
         WHERE id = ? AND token = ? AND state = 'leased'",
    )
    .bind(lease.shard_id)
    .bind(lease.token)
    .execute(&s.pool)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StoreError::LeaseLost {
            shard_id: lease.shard_id,
            token: lease.token,
        });
    }
    Ok(())
}
