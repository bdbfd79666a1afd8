//! The metastore over SQL, written once for both dialects. Statements use `$n` parameters
//! (both dialects read them), bind every state through its enum, and name the few fragments
//! that differ in braces (`{now}`, `{skip_locked}`, `{lock_row}`), which `Dialect::sql` fills
//! in. A dialect adds only what its SQL cannot share: opening the database, the output lock,
//! and the set-based statements PostgreSQL runs where SQLite takes requests one by one.

mod copies;
mod fleet;
pub(crate) mod jobs;
pub(crate) mod lease;
mod loops;
mod notify;
mod schedules;
mod views;

use std::borrow::Cow;

use async_trait::async_trait;
use nightshift_proto::wire::{JobPlan, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use sqlx::pool::PoolConnection;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Type};

use crate::{ClaimRequest, HeartbeatLot, LeaseHolder, LeaseTiming, Metastore, Result};

/// A value both dialects bind and read.
pub trait Value<DB: Database>: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> {}
impl<DB: Database, T> Value<DB> for T where
    T: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB>
{
}

/// A row of a dialect.
pub type RowOf<D> = <<D as Dialect>::DB as Database>::Row;

/// One SQL dialect: its database, the fragments its statements differ by, and the operations
/// it runs its own way.
#[async_trait]
pub trait Dialect: Send + Sync + Sized + 'static {
    type DB: Database<Arguments = Self::Args>;
    type Args: IntoArguments<Self::DB>;
    /// A connection as a statement runs on it.
    type Ex<'c>: Executor<'c, Database = Self::DB>;

    /// The database clock in milliseconds since the epoch, as an SQL expression.
    const NOW: &'static str;
    /// Appended to a query that picks rows to change: skip rows another session holds.
    const SKIP_LOCKED: &'static str;
    /// Appended to a query of a job row to change: hold it until the transaction ends.
    const LOCK_ROW: &'static str;
    /// Whether the migrations' bookkeeping table exists.
    const MIGRATED: &'static str;

    fn ex(conn: &mut Conn<Self>) -> Self::Ex<'_>;
    /// Rows a statement changed.
    fn affected(done: &<Self::DB as Database>::QueryResult) -> u64;
    fn migrator() -> sqlx::migrate::Migrator;
    async fn migrate(pool: &Pool<Self::DB>) -> Result<()>;

    /// Serialises the output check and insert of submissions and retries until `tx` ends.
    async fn lock_outputs(conn: &mut Conn<Self>) -> Result<()>;
    /// Inserts a job's input files (numbered from `first_file`) and shards, shard ids in plan
    /// order.
    async fn insert_plan(
        conn: &mut Conn<Self>,
        job_id: i64,
        plan: &JobPlan,
        first_file: u64,
    ) -> Result<()>;
    /// Runs after a job is committed (PostgreSQL refreshes statistics for a large one).
    async fn after_create(store: &SqlStore<Self>, shards: usize);
    async fn claim_many(
        store: &SqlStore<Self>,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>>;
    async fn heartbeat_many(
        store: &SqlStore<Self>,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>>;
    async fn checkpoint_many(
        store: &SqlStore<Self>,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>>;
    async fn complete_many(store: &SqlStore<Self>, leases: &[LeaseRef]) -> Result<Vec<Result<()>>>;
    async fn lease_holders(store: &SqlStore<Self>, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>>;

    /// A statement with this dialect's fragments filled in.
    fn sql(text: &str) -> sqlx::AssertSqlSafe<String> {
        let mut sql = Cow::Borrowed(text);
        for (name, fragment) in [
            ("{now}", Self::NOW),
            ("{skip_locked}", Self::SKIP_LOCKED),
            ("{lock_row}", Self::LOCK_ROW),
            ("{job}", crate::records::JOB_COLUMNS),
            ("{shard}", crate::records::SHARD_COLUMNS),
            ("{part}", crate::records::PART_COLUMNS),
            ("{granted}", crate::records::GRANTED_COLUMNS),
        ] {
            if sql.contains(name) {
                sql = Cow::Owned(sql.replace(name, fragment));
            }
        }
        sqlx::AssertSqlSafe(sql.into_owned())
    }
}

/// The metastore on a database of dialect `D`.
pub struct SqlStore<D: Dialect> {
    pub(crate) pool: Pool<D::DB>,
    /// For writes whose loss in a crash of the database only makes a worker redo fenced
    /// work (lease extensions, checkpoints, completions): on PostgreSQL its commits do not
    /// wait for the log to reach the disk, and they and the lease check's read keep one plan
    /// made for any parameters (see `postgres.rs`); elsewhere it is `pool`.
    pub(crate) relaxed: Pool<D::DB>,
    /// For claims: durable commits, but on PostgreSQL one plan made for any parameters and
    /// kept (see `postgres.rs`); elsewhere it is `pool`.
    pub(crate) claims: Pool<D::DB>,
}

impl<D: Dialect> SqlStore<D> {
    pub(crate) fn new(pool: Pool<D::DB>) -> Self {
        Self {
            relaxed: pool.clone(),
            claims: pool.clone(),
            pool,
        }
    }

    /// A connection of the pool.
    pub(crate) async fn conn(&self) -> Result<PoolConnection<D::DB>> {
        Ok(self.pool.acquire().await?)
    }
}

/// A connection of a dialect.
pub type Conn<D> = <<D as Dialect>::DB as Database>::Connection;

#[async_trait]
impl<D: Dialect> Metastore for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    async fn migrate(&self) -> Result<()> {
        D::migrate(&self.pool).await
    }

    async fn ready(&self) -> Result<bool> {
        // Before the first migration there is no bookkeeping table: not ready, not an error.
        let mut conn = self.conn().await?;
        let tracked: bool = sqlx::query_scalar(D::MIGRATED)
            .fetch_one(D::ex(&mut conn))
            .await?;
        if !tracked {
            return Ok(false);
        }
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(D::ex(&mut conn))
                .await?;
        Ok(usize::try_from(applied).unwrap_or(0) >= D::migrator().migrations.len())
    }

    async fn now_ms(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(D::sql("SELECT {now}"))
            .fetch_one(D::ex(&mut *self.conn().await?))
            .await?)
    }
}
