//! What the fleet needs from the store: the machine each worker runs on, drains asked of
//! workers, and each job's lease time by kind of machine (for its cost). Lease times are kept
//! by the migration's triggers on `shards`, whatever statement grants or ends a lease.

use async_trait::async_trait;
use nightshift_proto::ShardState;
use sqlx::{ColumnIndex, Encode, Type};

use super::{Dialect, RowOf, SqlStore, Value};
use crate::Fleet;
use crate::Result;
use crate::records::{UsageSum, WorkerMachine};

#[async_trait]
impl<D: Dialect> Fleet for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    async fn note_machine(&self, worker: &str, machine: &WorkerMachine) -> Result<()> {
        let instance = machine.instance.as_ref();
        let sql = D::sql(
            "INSERT INTO workers (id, last_seen_ms, instance_id, instance_type, capacity_type, \
             slots, gpus) VALUES ($1, {now}, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
             instance_id = excluded.instance_id, instance_type = excluded.instance_type, \
             capacity_type = excluded.capacity_type, slots = excluded.slots, gpus = excluded.gpus",
        );
        sqlx::query(sql)
            .bind(worker)
            .bind(instance.map(|i| i.id.as_str()))
            .bind(instance.map(|i| i.instance_type.as_str()))
            .bind(instance.map(|i| i.capacity_type.as_str()))
            .bind(i64::from(machine.slots))
            .bind(i64::from(machine.gpus))
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(())
    }

    async fn forget_workers(&self, unseen_ms: i64) -> Result<u64> {
        let sql = D::sql(
            "DELETE FROM workers WHERE last_seen_ms < {now} - $1 AND id NOT IN \
             (SELECT worker_id FROM shards WHERE state = $2 AND worker_id IS NOT NULL)",
        );
        let done = sqlx::query(sql)
            .bind(unseen_ms)
            .bind(ShardState::Leased.as_str())
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(D::affected(&done))
    }

    async fn request_drain(&self, worker: &str) -> Result<bool> {
        let sql = D::sql(
            "UPDATE workers SET drain_requested_at_ms = COALESCE(drain_requested_at_ms, {now}) \
             WHERE id = $1",
        );
        let done = sqlx::query(sql)
            .bind(worker)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(D::affected(&done) > 0)
    }

    async fn drain_told(&self, worker: &str) -> Result<()> {
        let sql = D::sql(
            "UPDATE workers SET drain_told_at_ms = COALESCE(drain_told_at_ms, {now}) \
             WHERE id = $1 AND drain_requested_at_ms IS NOT NULL",
        );
        sqlx::query(sql)
            .bind(worker)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(())
    }

    async fn draining_workers(&self, window_ms: i64) -> Result<Vec<String>> {
        let sql = D::sql(
            "SELECT id FROM workers WHERE drain_requested_at_ms IS NOT NULL \
             AND last_seen_ms > {now} - $1 ORDER BY id",
        );
        Ok(sqlx::query_scalar(sql)
            .bind(window_ms)
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    /// Ended leases from `lease_usage`, plus the leases held now up to the database clock,
    /// summed by the kind of machine they ran on.
    async fn job_usage(&self, job_id: i64) -> Result<Vec<UsageSum>> {
        let sql = D::sql(
            "SELECT instance_type, capacity_type, slots, gpus, \
             CAST(SUM(held_ms) AS BIGINT) AS held_ms, CAST(SUM(lost_ms) AS BIGINT) AS lost_ms \
             FROM ( \
                 SELECT instance_type, capacity_type, slots, gpus, held_ms, lost_ms \
                 FROM lease_usage WHERE job_id = $1 \
                 UNION ALL \
                 SELECT w.instance_type, w.capacity_type, COALESCE(w.slots, 1) AS slots, \
                 COALESCE(w.gpus, 0) AS gpus, {now} - s.leased_at_ms AS held_ms, 0 AS lost_ms \
                 FROM shards s LEFT JOIN workers w ON w.id = s.worker_id \
                 WHERE s.job_id = $1 AND s.state = $2 AND s.leased_at_ms IS NOT NULL \
             ) u GROUP BY instance_type, capacity_type, slots, gpus \
             ORDER BY instance_type, capacity_type, slots, gpus",
        );
        Ok(sqlx::query_as(sql)
            .bind(job_id)
            .bind(ShardState::Leased.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }
}
