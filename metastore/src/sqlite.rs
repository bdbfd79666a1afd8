//! SQLite: the embedded metastore of a one-machine run. One connection (SQLite has one
//! writer, and a single connection cannot deadlock on lock upgrades), so every transaction
//! runs alone: no output lock is needed, and requests are taken one at a time.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::wire::{JobPlan, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::{Pool, Sqlite as SqliteDb};

use crate::sql::{Conn, Dialect, SqlStore};
use crate::{ClaimRequest, HeartbeatLot, LeaseHolder, LeaseTiming, Result, StoreError, migrations};

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

    async fn insert_plan(
        conn: &mut Conn<Self>,
        job_id: i64,
        plan: &JobPlan,
        first_file: u64,
    ) -> Result<()> {
        SqliteStore::insert_plan_rows(conn, job_id, plan, first_file).await
    }

    async fn after_create(_store: &SqliteStore, _shards: usize) {}

    async fn claim_many(
        store: &SqliteStore,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>> {
        store.claim_each(requests, timing).await
    }

    async fn heartbeat_many(
        store: &SqliteStore,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>> {
        store.heartbeat_each(requests, timing).await
    }

    async fn checkpoint_many(
        store: &SqliteStore,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>> {
        store.checkpoint_each(checkpoints).await
    }

    async fn complete_many(store: &SqliteStore, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        store.complete_each(leases).await
    }

    async fn lease_holders(store: &SqliteStore, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        store.lease_holders_each(shard_ids).await
    }
}
