//! Speculative copies of stragglers (`speculation.rs` has the rule): finding stragglers,
//! granting a copy, and deciding each race once one side has finished.

use async_trait::async_trait;
use nightshift_proto::wire::ShardLease;
use nightshift_proto::{JobState, ShardState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Conn, Dialect, RowOf, SqlStore, Value};
use crate::Copies;
use crate::rules::ShardKind;
use crate::speculation::{MEDIAN_SAMPLE, ShardTiming, SpeculationPolicy, stragglers};
use crate::{CopyOutcome, LeaseTiming, Result, new_lease_secret};

/// A copy whose race is decided, with its original.
#[derive(sqlx::FromRow)]
struct Race {
    id: i64,
    copy_of: i64,
    #[sqlx(try_from = "String")]
    state: ShardState,
    #[sqlx(try_from = "String")]
    original: ShardState,
}

#[async_trait]
impl<D: Dialect> Copies for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// Copies of stragglers for `worker`, at most `max`, none of a shard it holds.
    async fn speculate(
        &self,
        worker: &str,
        max: u32,
        policy: &SpeculationPolicy,
        timing: LeaseTiming,
    ) -> Result<Vec<ShardLease>> {
        let mut tx = self.pool.begin().await?;
        let now: i64 = sqlx::query_scalar(D::sql("SELECT {now}"))
            .fetch_one(D::ex(&mut tx))
            .await?;
        let mut granted = Vec::new();
        for job in Self::tail_jobs(&mut tx, policy).await? {
            let shards = Self::timings(&mut tx, job).await?;
            for shard in stragglers(&shards, policy, now) {
                if granted.len() >= max as usize {
                    break;
                }
                if let Some(copy) = Self::start_copy(&mut tx, shard, worker, timing).await? {
                    granted.push(Self::granted(&mut tx, copy).await?);
                }
            }
        }
        let leases = Self::leases(&mut tx, granted).await?;
        tx.commit().await?;
        Ok(leases)
    }

    /// Decides every race that is over: a copy that completed while its original still runs
    /// (or waits) wins; a copy whose original finished first, or that stopped (expired,
    /// released, failed), is dropped with its parts.
    async fn resolve_copies(&self) -> Result<CopyOutcome> {
        let mut tx = self.pool.begin().await?;
        let races: Vec<Race> = sqlx::query_as(
            "SELECT c.id, c.copy_of, c.state, s.state AS original FROM shards c \
             JOIN shards s ON s.id = c.copy_of \
             WHERE c.kind = $1 AND (c.state <> $2 OR s.state IN ($3, $4)) ORDER BY c.id",
        )
        .bind(ShardKind::Copy.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(ShardState::Done.as_str())
        .bind(ShardState::Dead.as_str())
        .fetch_all(D::ex(&mut tx))
        .await?;
        let mut outcome = CopyOutcome::default();
        for race in races {
            let open = matches!(race.original, ShardState::Leased | ShardState::Pending);
            if race.state == ShardState::Done && open && Self::adopt_copy(&mut tx, &race).await? {
                outcome.won += 1;
            } else {
                outcome.dropped += 1;
            }
            sqlx::query("DELETE FROM parts WHERE shard_id = $1")
                .bind(race.id)
                .execute(D::ex(&mut tx))
                .await?;
            sqlx::query("DELETE FROM shards WHERE id = $1")
                .bind(race.id)
                .execute(D::ex(&mut tx))
                .await?;
        }
        tx.commit().await?;
        Ok(outcome)
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
    /// Running jobs, planned whole, with no pending row shard and a few leased ones.
    async fn tail_jobs(conn: &mut Conn<D>, policy: &SpeculationPolicy) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT j.id FROM jobs j WHERE j.state = $1 AND NOT j.planning \
               AND NOT EXISTS (SELECT 1 FROM shards p WHERE p.job_id = j.id AND p.kind = $2 \
                 AND p.state = $3) \
               AND (SELECT COUNT(*) FROM shards l WHERE l.job_id = j.id AND l.kind = $2 \
                 AND l.state = $4) BETWEEN 1 AND $5 \
             ORDER BY j.id",
        )
        .bind(JobState::Running.as_str())
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Pending.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(i64::from(policy.max_left))
        .fetch_all(D::ex(conn))
        .await?)
    }

    /// A job's leased row shards and its most recently done ones.
    async fn timings(conn: &mut Conn<D>, job: i64) -> Result<Vec<ShardTiming>> {
        let columns = "s.id, s.state, s.rows, s.leased_at_ms, s.checkpoint_at_ms, \
             EXISTS (SELECT 1 FROM shards c WHERE c.copy_of = s.id AND c.kind = $4) AS copied";
        let mut shards: Vec<ShardTiming> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {columns} FROM shards s WHERE s.job_id = $1 AND s.kind = $2 AND s.state = $3"
        )))
        .bind(job)
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(ShardKind::Copy.as_str())
        .fetch_all(D::ex(&mut *conn))
        .await?;
        let done: Vec<ShardTiming> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {columns} FROM shards s WHERE s.job_id = $1 AND s.kind = $2 AND s.state = $3 \
             ORDER BY s.checkpoint_at_ms DESC LIMIT $5"
        )))
        .bind(job)
        .bind(ShardKind::Rows.as_str())
        .bind(ShardState::Done.as_str())
        .bind(ShardKind::Copy.as_str())
        .bind(MEDIAN_SAMPLE)
        .fetch_all(D::ex(conn))
        .await?;
        shards.extend(done);
        Ok(shards)
    }

    /// A copy of the leased row shard `shard`, granted to `worker` from the shard's
    /// checkpoint; none when the shard is the worker's own, no longer leased, all
    /// checkpointed, or copied already.
    async fn start_copy(
        conn: &mut Conn<D>,
        shard: i64,
        worker: &str,
        timing: LeaseTiming,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(D::sql(
            "INSERT INTO shards (job_id, kind, copy_of, file_index, row_group_start, \
               row_group_end, file_row_start, rows, state, token, attempts, checkpoint_rows, \
               worker_id, lease_secret, lease_expires_at_ms, leased_at_ms) \
             SELECT job_id, $2, id, file_index, row_group_start, row_group_end, file_row_start, \
               rows, $3, 1, 1, checkpoint_rows, $4, $5, {now} + $6, {now} \
             FROM shards WHERE id = $1 AND kind = $7 AND state = $3 AND checkpoint_rows < rows \
               AND worker_id <> $4 \
             ON CONFLICT DO NOTHING RETURNING id",
        ))
        .bind(shard)
        .bind(ShardKind::Copy.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(worker)
        .bind(new_lease_secret().to_hex())
        .bind(timing.ttl_ms)
        .bind(ShardKind::Rows.as_str())
        .fetch_optional(D::ex(conn))
        .await?)
    }

    /// The original of a copy that won is done, fenced (its holder's token is stale), and
    /// holds its own parts before the copy's first row and the copy's parts from there.
    async fn adopt_copy(conn: &mut Conn<D>, race: &Race) -> Result<bool> {
        let ended = sqlx::query(
            "UPDATE shards SET state = $2, token = token + 1, checkpoint_rows = rows, \
               worker_id = NULL, lease_expires_at_ms = NULL \
             WHERE id = $1 AND state IN ($3, $4)",
        )
        .bind(race.copy_of)
        .bind(ShardState::Done.as_str())
        .bind(ShardState::Leased.as_str())
        .bind(ShardState::Pending.as_str())
        .execute(D::ex(&mut *conn))
        .await?;
        if D::affected(&ended) == 0 {
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM parts WHERE shard_id = $1 AND row_start >= \
               (SELECT MIN(c.row_start) FROM parts c WHERE c.shard_id = $2)",
        )
        .bind(race.copy_of)
        .bind(race.id)
        .execute(D::ex(&mut *conn))
        .await?;
        sqlx::query("UPDATE parts SET shard_id = $1 WHERE shard_id = $2")
            .bind(race.copy_of)
            .bind(race.id)
            .execute(D::ex(&mut *conn))
            .await?;
        sqlx::query(
            "UPDATE shards SET error_rows = (SELECT COALESCE(SUM(p.error_rows), 0) FROM parts p \
               WHERE p.shard_id = $1) WHERE id = $1",
        )
        .bind(race.copy_of)
        .execute(D::ex(conn))
        .await?;
        Ok(true)
    }
}
