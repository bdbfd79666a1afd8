//! SQLite store: the embedded default for one machine. SQLite has a single writer, so the
//! lease statements are the PostgreSQL ones without SKIP LOCKED, run through one connection.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::wire::{
    HeartbeatResponse, InputFile, LeaseRef, LeaseStatus, PartRecord, ShardCounts, ShardLease,
    ShardPlan,
};
use nightshift_proto::{FailureClass, JobSpec, JobState, LeaseState, ShardState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    JobOutcome, JobRecord, LeaseTiming, NewJob, PartRow, Result, ShardRow, Store, StoreError,
    StoreMetrics, Submitted, migrations,
};

pub struct SqliteStore {
    pool: SqlitePool,
}

const NOW: &str = "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

macro_rules! job_cols {
    () => {
        "id, uid, name, idempotency_key, spec_json, spec_hash, state, priority, rows_total, \
         output_uri, error, created_at_ms, started_at_ms, finished_at_ms"
    };
}

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

fn parse_state<T: FromStr<Err = String>>(s: &str) -> Result<T> {
    s.parse().map_err(StoreError::Corrupt)
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord> {
    let spec_json: String = row.try_get("spec_json")?;
    let spec: JobSpec = serde_json::from_str(&spec_json)
        .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        uid: row.try_get("uid")?,
        name: row.try_get("name")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec,
        spec_hash: row.try_get("spec_hash")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        rows_total: row.try_get::<i64, _>("rows_total")? as u64,
        output_uri: row.try_get("output_uri")?,
        error: row.try_get("error")?,
        created_at_ms: row.try_get("created_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
    })
}

#[async_trait]
impl Store for SqliteStore {
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
        let mut tx = self.pool.begin().await?;
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
        let now = Self::now(&mut tx).await?;
        let spec_json = serde_json::to_string(&job.spec)
            .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (uid, name, idempotency_key, spec_json, spec_hash, state, priority, \
             max_attempts, rows_total, output_uri, created_at_ms, started_at_ms) \
             VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?) RETURNING id",
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
        let record = Self::job_in(&mut tx, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        tx.commit().await?;
        Ok(Submitted::Created(record))
    }

    async fn job_by_key(&self, key: &str) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE idempotency_key = ?"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn job(&self, id: i64) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn job_by_name(&self, name: &str) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1"
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
            " FROM jobs ORDER BY id DESC LIMIT ?"
        ))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn shard_counts(&self, job_id: i64) -> Result<(ShardCounts, u64, u64)> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(checkpoint_rows), 0) AS done, \
             COALESCE(SUM(error_rows), 0) AS errors FROM shards WHERE job_id = ? GROUP BY state",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut counts = ShardCounts::default();
        let (mut done, mut errors) = (0u64, 0u64);
        for row in rows {
            let n = row.try_get::<i64, _>("n")? as u64;
            done += row.try_get::<i64, _>("done")? as u64;
            errors += row.try_get::<i64, _>("errors")? as u64;
            match parse_state::<ShardState>(&row.try_get::<String, _>("state")?)? {
                ShardState::Pending => counts.pending = n,
                ShardState::Leased => counts.leased = n,
                ShardState::Done => counts.done = n,
                ShardState::Dead => counts.dead = n,
            }
        }
        Ok((counts, done, errors))
    }

    async fn shards(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        let rows = sqlx::query(
            "SELECT id, job_id, file_index, rows, state, token, attempts, checkpoint_rows, \
             error_rows, error FROM shards WHERE job_id = ? ORDER BY id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ShardRow {
                    id: r.try_get("id")?,
                    job_id: r.try_get("job_id")?,
                    file_index: r.try_get::<i64, _>("file_index")? as u32,
                    rows: r.try_get::<i64, _>("rows")? as u64,
                    state: parse_state(&r.try_get::<String, _>("state")?)?,
                    token: r.try_get("token")?,
                    attempts: r.try_get::<i64, _>("attempts")? as u32,
                    checkpoint_rows: r.try_get::<i64, _>("checkpoint_rows")? as u64,
                    error_rows: r.try_get::<i64, _>("error_rows")? as u64,
                    error: r.try_get("error")?,
                })
            })
            .collect()
    }

    async fn input_files(&self, job_id: i64) -> Result<Vec<InputFile>> {
        let rows =
            sqlx::query("SELECT uri, size, etag FROM input_files WHERE job_id = ? ORDER BY idx")
                .bind(job_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(InputFile {
                    uri: r.try_get("uri")?,
                    size: r.try_get::<i64, _>("size")? as u64,
                    etag: r.try_get("etag")?,
                })
            })
            .collect()
    }

    async fn cancel_job(&self, id: i64) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        let job = Self::job_in(&mut tx, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        match job.state {
            JobState::Cancelled => return Ok(job),
            JobState::Pending | JobState::Planning | JobState::Running => {}
            state => {
                return Err(StoreError::BadTransition {
                    job_id: id,
                    state,
                    action: "cancel",
                });
            }
        }
        let now = Self::now(&mut tx).await?;
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at_ms = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let job = Self::job_in(&mut tx, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        tx.commit().await?;
        Ok(job)
    }

    async fn retry_job(&self, id: i64) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        let job = Self::job_in(&mut tx, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            return Err(StoreError::BadTransition {
                job_id: id,
                state: job.state,
                action: "retry",
            });
        }
        sqlx::query(
            "UPDATE shards SET state = 'pending', attempts = 0, not_before_ms = 0, error = NULL, \
             error_class = NULL WHERE job_id = ? AND state = 'dead'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'running', error = NULL, finished_at_ms = NULL WHERE id = ?",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let job = Self::job_in(&mut tx, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        tx.commit().await?;
        Ok(job)
    }

    async fn delete_job(&self, id: i64) -> Result<()> {
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Running jobs by priority through `jobs_running`, each one's pending shards in id order
    /// through `shards_job`: that nested loop yields the ORDER BY as is, so the LIMIT stops it
    /// after `max` shards however many are pending.
    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>> {
        let mut tx = self.pool.begin().await?;
        let now = Self::now(&mut tx).await?;
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
             worker_id = ?, lease_expires_at_ms = ? \
             WHERE id IN (SELECT s.id FROM jobs j JOIN shards s ON s.job_id = j.id \
                          WHERE s.state = 'pending' AND j.state = 'running' AND s.not_before_ms <= ? \
                          ORDER BY j.priority DESC, j.id, s.id LIMIT ?) \
             RETURNING id, job_id, file_index, row_group_start, row_group_end, file_row_start, \
                       rows, token, attempts, checkpoint_rows",
        )
        .bind(worker)
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
                    Self::job_in(&mut tx, job_id)
                        .await?
                        .ok_or(StoreError::JobNotFound(job_id))?,
                ),
            };
            let file_index: i64 = r.try_get("file_index")?;
            let f =
                sqlx::query("SELECT uri, size, etag FROM input_files WHERE job_id = ? AND idx = ?")
                    .bind(job_id)
                    .bind(file_index)
                    .fetch_one(&mut *tx)
                    .await?;
            leases.push(ShardLease {
                job_id,
                job_uid: job.uid.clone(),
                shard_id: r.try_get("id")?,
                token: r.try_get("token")?,
                attempt: r.try_get::<i64, _>("attempts")? as u32,
                file: InputFile {
                    uri: f.try_get("uri")?,
                    size: f.try_get::<i64, _>("size")? as u64,
                    etag: f.try_get("etag")?,
                },
                plan: ShardPlan {
                    file_index: file_index as u32,
                    row_group_start: r.try_get::<i64, _>("row_group_start")? as u32,
                    row_group_end: r.try_get::<i64, _>("row_group_end")? as u32,
                    file_row_start: r.try_get::<i64, _>("file_row_start")? as u64,
                    rows: r.try_get::<i64, _>("rows")? as u64,
                },
                checkpoint_rows: r.try_get::<i64, _>("checkpoint_rows")? as u64,
                spec: job.spec.clone(),
            });
        }
        tx.commit().await?;
        leases.sort_by_key(|l| l.shard_id);
        Ok(leases)
    }

    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        let mut tx = self.pool.begin().await?;
        let now = Self::now(&mut tx).await?;
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

    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
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
        if part.row_start != done
            || part.row_start.saturating_add(part.rows) > rows
            || part.rows == 0
        {
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
            let job = Self::job_in(&mut tx, job_id)
                .await?
                .ok_or(StoreError::JobNotFound(job_id))?;
            let errors: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(error_rows), 0) FROM shards WHERE job_id = ?",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(message) = super::records::error_threshold_exceeded(&job, errors as u64) {
                let now = Self::now(&mut tx).await?;
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

    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        let mut tx = self.pool.begin().await?;
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
            let e = Self::lease_error(&mut tx, lease).await?;
            // Finishing a shard of a job that was cancelled meanwhile is not an error for it.
            if !matches!(e, StoreError::JobNotRunning { .. }) {
                return Err(e);
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
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
        let now = Self::now(&mut tx).await?;
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

    async fn release(&self, lease: LeaseRef) -> Result<()> {
        let n = sqlx::query(
            "UPDATE shards SET state = 'pending', attempts = MAX(attempts - 1, 0), \
             worker_id = NULL, lease_expires_at_ms = NULL, not_before_ms = 0 \
             WHERE id = ? AND token = ? AND state = 'leased'",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .execute(&self.pool)
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

    async fn reap_expired(&self, timing: LeaseTiming) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let now = Self::now(&mut tx).await?;
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

    async fn settle_jobs(&self) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // Jobs without shards count too: with nothing to run they have nothing to wait for.
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            ", (SELECT COUNT(*) FROM shards s WHERE s.job_id = jobs.id AND s.state = 'dead') \
                 AS dead, \
               (SELECT COALESCE(SUM(s.error_rows), 0) FROM shards s WHERE s.job_id = jobs.id) \
                 AS error_rows, \
               (SELECT MIN(s.id) FROM shards s WHERE s.job_id = jobs.id AND s.state = 'dead') \
                 AS first_dead \
             FROM jobs WHERE state = 'running' AND NOT EXISTS ( \
               SELECT 1 FROM shards s \
               WHERE s.job_id = jobs.id AND s.state IN ('pending', 'leased')) \
             ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let now = Self::now(&mut tx).await?;
        let mut n = 0;
        for r in rows {
            let job = job_from_row(&r)?;
            let dead: i64 = r.try_get("dead")?;
            let failure = if dead > 0 {
                let first: i64 = r.try_get("first_dead")?;
                let error: Option<String> =
                    sqlx::query_scalar("SELECT error FROM shards WHERE id = ?")
                        .bind(first)
                        .fetch_one(&mut *tx)
                        .await?;
                Some(super::records::dead_shards_message(
                    dead,
                    first,
                    error.as_deref(),
                ))
            } else {
                // Checkpoints fail a job when its poison rows pass the threshold; this catches
                // a job that comes back (retry) with them already past it.
                let errors: i64 = r.try_get("error_rows")?;
                super::records::error_threshold_exceeded(&job, errors as u64)
            };
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

    async fn claim_finalize(&self, owner: &str, ttl_ms: i64) -> Result<Option<JobRecord>> {
        let mut tx = self.pool.begin().await?;
        let now = Self::now(&mut tx).await?;
        let id: Option<i64> = sqlx::query_scalar(
            "UPDATE jobs SET finalizer_owner = ?, finalizer_expires_at_ms = ? \
             WHERE id = (SELECT id FROM jobs WHERE state = 'finalizing' \
                         AND (finalizer_expires_at_ms IS NULL OR finalizer_expires_at_ms < ?) \
                         ORDER BY id LIMIT 1) RETURNING id",
        )
        .bind(owner)
        .bind(now + ttl_ms)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let job = match id {
            Some(id) => Self::job_in(&mut tx, id).await?,
            None => None,
        };
        tx.commit().await?;
        Ok(job)
    }

    async fn parts(&self, job_id: i64) -> Result<Vec<PartRow>> {
        let rows = sqlx::query(
            "SELECT shard_id, token, row_start, rows, bytes, uri, error_rows, error_uri, error_bytes \
             FROM parts WHERE job_id = ? ORDER BY shard_id, row_start",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PartRow {
                    shard_id: r.try_get("shard_id")?,
                    token: r.try_get("token")?,
                    row_start: r.try_get::<i64, _>("row_start")? as u64,
                    rows: r.try_get::<i64, _>("rows")? as u64,
                    bytes: r.try_get::<i64, _>("bytes")? as u64,
                    uri: r.try_get("uri")?,
                    error_rows: r.try_get::<i64, _>("error_rows")? as u64,
                    error_uri: r.try_get("error_uri")?,
                    error_bytes: r.try_get::<i64, _>("error_bytes")? as u64,
                })
            })
            .collect()
    }

    async fn finish_job(&self, job_id: i64, owner: &str, outcome: JobOutcome) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let now = Self::now(&mut tx).await?;
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
            let job = Self::job_in(&mut tx, job_id)
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

    async fn metrics(&self, workers_window_ms: i64) -> Result<StoreMetrics> {
        let row = sqlx::query(
            "SELECT \
               (SELECT COUNT(*) FROM shards s JOIN jobs j ON j.id = s.job_id \
                  WHERE s.state = 'pending' AND j.state = 'running') AS pending, \
               (SELECT COALESCE(SUM(s.rows - s.checkpoint_rows), 0) FROM shards s \
                  JOIN jobs j ON j.id = s.job_id WHERE s.state = 'pending' AND j.state = 'running') AS pending_rows, \
               (SELECT COUNT(*) FROM shards WHERE state = 'leased') AS leased, \
               (SELECT COUNT(*) FROM jobs WHERE state = 'running') AS running, \
               (SELECT COUNT(*) FROM workers WHERE last_seen_ms > \
                  CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) - ?) AS workers",
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
        Ok(sqlx::query_scalar(NOW).fetch_one(&self.pool).await?)
    }
}

impl SqliteStore {
    /// Local mode, after a crash: no other process can hold this database's leases or
    /// finalizer claims (the run holds its lock file), so every one still marked held is from
    /// the dead run. Expire them now instead of waiting out their TTL; the reaper returns the
    /// shards to the queue and the finalizer takes the job again. Returns the shards freed.
    pub async fn recover_after_crash(&self) -> Result<u64> {
        sqlx::query(
            "UPDATE jobs SET finalizer_expires_at_ms = 0 WHERE finalizer_owner IS NOT NULL",
        )
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query("UPDATE shards SET lease_expires_at_ms = 0 WHERE state = 'leased'")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
