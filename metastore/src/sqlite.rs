//! SQLite: the embedded metastore of a one-machine run. One connection (SQLite has one
//! writer, and a single connection cannot deadlock on lock upgrades), so every transaction
//! runs alone: no output lock is needed, and requests are taken one at a time.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::wire::{JobPlan, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use nightshift_proto::{JobState, ShardState};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::{Pool, Sqlite as SqliteDb};

use crate::records::HolderRow;
use crate::rules;
use crate::sql::jobs::count;
use crate::sql::lease::HOLDER;
use crate::sql::{Dialect, SqlStore};
use crate::{
    ClaimRequest, HeartbeatLot, LeaseHolder, LeaseTiming, Leases, Result, StoreError, migrations,
    new_lease_secret,
};

/// How long a statement waits for the database file's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a call waits for the one connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(60);

/// The SQLite dialect.
pub struct Sqlite;

pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating if needed) the database file. Does not migrate.
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
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await?;
        Ok(Self::new(pool))
    }
}

#[async_trait]
impl Dialect for Sqlite {
    type DB = SqliteDb;
    type Args = sqlx::sqlite::SqliteArguments;
    type Ex<'c> = &'c mut SqliteConnection;

    const NOW: &'static str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
    const SKIP_LOCKED: &'static str = "";
    const LOCK_ROW: &'static str = "";
    const MIGRATED: &'static str = "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'table' AND name = '_sqlx_migrations')";

    fn ex(conn: &mut SqliteConnection) -> &mut SqliteConnection {
        conn
    }

    fn affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn migrator() -> sqlx::migrate::Migrator {
        migrations::sqlite()
    }

    async fn migrate(pool: &Pool<SqliteDb>) -> Result<()> {
        migrations::sqlite().run(pool).await?;
        Ok(())
    }

    async fn lock_outputs(_conn: &mut SqliteConnection) -> Result<()> {
        Ok(())
    }

    /// Inserts a plan's files and shards one row at a time (what SQLite does; PostgreSQL
    /// inserts each as one array).
    async fn insert_plan(
        conn: &mut SqliteConnection,
        job_id: i64,
        plan: &JobPlan,
        first_file: u64,
    ) -> Result<()> {
        for (idx, f) in (first_file..).zip(&plan.files) {
            sqlx::query(
                "INSERT INTO input_files (job_id, idx, uri, size, etag) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(job_id)
            .bind(count(idx))
            .bind(f.uri.as_str())
            .bind(count(f.size))
            .bind(f.etag.as_deref())
            .execute(&mut *conn)
            .await?;
        }
        for s in &plan.shards {
            sqlx::query(
                "INSERT INTO shards (job_id, file_index, row_group_start, row_group_end, \
                 file_row_start, rows) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(job_id)
            .bind(i64::from(s.file_index))
            .bind(i64::from(s.row_group_start))
            .bind(i64::from(s.row_group_end))
            .bind(count(s.file_row_start))
            .bind(count(s.rows))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn after_create(_store: &SqliteStore, _shards: usize) {}

    /// Claims for each request in turn, in one transaction: running jobs in the order claims
    /// serve them (`rules::serve_order`), each one's pending shards in id order.
    async fn claim_many(
        store: &SqliteStore,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>> {
        let mut tx = store.pool.begin().await?;
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            note_worker(&mut tx, &r.worker).await?;
            let jobs: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM jobs WHERE state = $1 ORDER BY {}",
                rules::serve_order("$1", "$2")
            )))
            .bind(JobState::Running.as_str())
            .bind(ShardState::Leased.as_str())
            .fetch_all(&mut *tx)
            .await?;
            let secret = new_lease_secret().to_hex();
            let mut ids: Vec<i64> = Vec::with_capacity(r.max as usize);
            for job in jobs {
                let left = i64::from(r.max) - ids.len() as i64;
                if left <= 0 {
                    break;
                }
                let got: Vec<i64> = sqlx::query_scalar(Sqlite::sql(
                    "UPDATE shards SET state = $1, token = token + 1, attempts = attempts + 1, \
                     worker_id = $2, lease_secret = $3, lease_expires_at_ms = {now} + $4 \
                     WHERE id IN (SELECT id FROM shards WHERE job_id = $5 AND state = $6 \
                       AND not_before_ms <= {now} ORDER BY id LIMIT $7) \
                     RETURNING id",
                ))
                .bind(ShardState::Leased.as_str())
                .bind(r.worker.as_str())
                .bind(secret.as_str())
                .bind(timing.ttl_ms)
                .bind(job)
                .bind(ShardState::Pending.as_str())
                .bind(left)
                .fetch_all(&mut *tx)
                .await?;
                ids.extend(got);
            }
            let mut granted = Vec::with_capacity(ids.len());
            for id in ids {
                granted.push(SqliteStore::granted(&mut tx, id).await?);
            }
            let mut leases = SqliteStore::leases(&mut tx, granted).await?;
            leases.sort_by_key(|l| l.shard_id);
            answers.push(leases);
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// Extends each lease still held, one at a time, in one transaction for all requests.
    async fn heartbeat_many(
        store: &SqliteStore,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>> {
        let mut tx = store.pool.begin().await?;
        let mut answers = Vec::with_capacity(requests.len());
        for lot in requests {
            note_worker(&mut tx, &lot.worker).await?;
            let mut statuses = Vec::with_capacity(lot.leases.len());
            for &l in &lot.leases {
                let extended = sqlx::query(Sqlite::sql(
                    "UPDATE shards SET lease_expires_at_ms = {now} + $3 \
                     WHERE id = $1 AND token = $2 AND state = $4 \
                       AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = shards.job_id AND j.state = $5)",
                ))
                .bind(l.shard_id)
                .bind(l.token)
                .bind(timing.ttl_ms)
                .bind(ShardState::Leased.as_str())
                .bind(JobState::Running.as_str())
                .execute(&mut *tx)
                .await?;
                let held = extended.rows_affected() > 0;
                statuses.push(SqliteStore::heartbeat_status(&mut tx, l, held).await?);
            }
            answers.push(statuses);
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// Several checkpoints in one transaction, one after the other: one answer each, in
    /// order, each what `checkpoint` alone would give (a refused one changes nothing). Only a
    /// failure of the store itself fails the whole call, and then none is recorded.
    async fn checkpoint_many(
        store: &SqliteStore,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>> {
        let mut tx = store.pool.begin().await?;
        let mut answers = Vec::with_capacity(checkpoints.len());
        for (lease, part) in checkpoints {
            answers.push(record_part(&mut tx, *lease, part).await?);
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// Completes each lease in turn; only a failure of the store fails the whole call.
    async fn complete_many(store: &SqliteStore, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        let mut answers = Vec::with_capacity(leases.len());
        for &lease in leases {
            match store.complete(lease).await {
                Err(e) if !e.is_lease_refusal() => return Err(e),
                answer => answers.push(answer),
            }
        }
        Ok(answers)
    }

    async fn lease_holders(store: &SqliteStore, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        let mut conn = store.conn().await?;
        let mut holders = Vec::with_capacity(shard_ids.len());
        for &id in shard_ids {
            let row: Option<HolderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{HOLDER} WHERE s.id = $1 AND s.state = $2"
            )))
            .bind(id)
            .bind(ShardState::Leased.as_str())
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                holders.push(row.try_into()?);
            }
        }
        Ok(holders)
    }
}

/// Moves the checkpoint past `part` and records it, inside `tx`; the inner `Err` is the
/// refusal, when the lease may not write this part.
async fn record_part(
    tx: &mut SqliteConnection,
    lease: LeaseRef,
    part: &PartRecord,
) -> Result<Result<()>> {
    let job_id: Option<i64> = sqlx::query_scalar(
        "UPDATE shards SET checkpoint_rows = checkpoint_rows + $3, \
           error_rows = error_rows + $4 \
         WHERE id = $1 AND token = $2 AND state = $7 \
           AND checkpoint_rows = $5 AND $3 > 0 AND $6 <= rows \
           AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = shards.job_id AND j.state = $8) \
         RETURNING job_id",
    )
    .bind(lease.shard_id)
    .bind(lease.token)
    .bind(count(part.rows))
    .bind(count(part.error_rows))
    .bind(count(part.row_start))
    .bind(count(part.row_start.saturating_add(part.rows)))
    .bind(ShardState::Leased.as_str())
    .bind(JobState::Running.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job_id) = job_id else {
        let row = SqliteStore::lease_row(&mut *tx, lease.shard_id).await?;
        return Ok(Err(rules::checkpoint_refused(row.as_ref(), lease, part)));
    };
    let tokens = part.tokens.unwrap_or_default();
    sqlx::query(Sqlite::sql(
        "INSERT INTO parts (job_id, shard_id, token, row_start, rows, bytes, uri, \
         error_rows, error_uri, error_bytes, real_tokens, padded_tokens, truncated_rows, \
         created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, {now})",
    ))
    .bind(job_id)
    .bind(lease.shard_id)
    .bind(lease.token)
    .bind(count(part.row_start))
    .bind(count(part.rows))
    .bind(count(part.bytes))
    .bind(part.uri.as_str())
    .bind(count(part.error_rows))
    .bind(part.error_uri.as_deref())
    .bind(count(part.error_bytes))
    .bind(count(tokens.real))
    .bind(count(tokens.padded))
    .bind(count(tokens.truncated_rows))
    .execute(&mut *tx)
    .await?;
    if part.error_rows > 0 {
        SqliteStore::check_error_rows(tx, job_id).await?;
    }
    Ok(Ok(()))
}

/// Notes that a worker was seen now.
async fn note_worker(conn: &mut SqliteConnection, worker: &str) -> Result<()> {
    sqlx::query(Sqlite::sql(
        "INSERT INTO workers (id, last_seen_ms) VALUES ($1, {now}) \
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
    ))
    .bind(worker)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
