//! What the dashboard reads beyond jobs: a job's rows over time, and the workers with the
//! shards they hold.

use async_trait::async_trait;
use nightshift_proto::{JobSpec, JobState, ShardState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Dialect, RowOf, SqlStore, Value};
use crate::Result;
use crate::Views;
use crate::records::{LeasedShard, RowsAt, TokenSums, WorkerSeen};

#[async_trait]
impl<D: Dialect> Views for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    async fn rows_over_time(&self, job_id: i64, bucket_ms: i64) -> Result<Vec<RowsAt>> {
        Ok(sqlx::query_as(
            "SELECT (created_at_ms / $2) * $2 AS at_ms, CAST(SUM(rows) AS BIGINT) AS rows \
             FROM parts WHERE job_id = $1 AND created_at_ms > 0 GROUP BY 1 ORDER BY 1",
        )
        .bind(job_id)
        .bind(bucket_ms.max(1))
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?)
    }

    async fn workers_seen(&self, window_ms: i64) -> Result<Vec<WorkerSeen>> {
        let sql = D::sql(
            "SELECT w.id, w.last_seen_ms, CAST(COALESCE(r.rows, 0) AS BIGINT) AS rows_recent, \
             w.instance_id, w.instance_type, w.capacity_type, w.slots, \
             (w.drain_requested_at_ms IS NOT NULL) AS draining, \
             (w.drain_told_at_ms IS NOT NULL) AS drain_told \
             FROM workers w LEFT JOIN ( \
                 SELECT s.worker_id, SUM(p.rows) AS rows FROM parts p \
                 JOIN shards s ON s.id = p.shard_id \
                 WHERE p.created_at_ms > {now} - $1 GROUP BY s.worker_id \
             ) r ON r.worker_id = w.id \
             WHERE w.last_seen_ms > {now} - $1 \
                OR w.id IN (SELECT worker_id FROM shards WHERE state = $2) \
             ORDER BY w.id",
        );
        Ok(sqlx::query_as(sql)
            .bind(window_ms)
            .bind(ShardState::Leased.as_str())
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn leased_shards(&self) -> Result<Vec<LeasedShard>> {
        Ok(sqlx::query_as(
            "SELECT worker_id, job_id, id AS shard_id, rows, checkpoint_rows, lease_expires_at_ms \
             FROM shards \
             WHERE state = $1 AND worker_id IS NOT NULL ORDER BY worker_id, id",
        )
        .bind(ShardState::Leased.as_str())
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?)
    }

    async fn token_sums(&self, job_id: i64) -> Result<TokenSums> {
        Ok(sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(real_tokens), 0) AS BIGINT) AS real, \
             CAST(COALESCE(SUM(padded_tokens), 0) AS BIGINT) AS padded, \
             CAST(COALESCE(SUM(truncated_rows), 0) AS BIGINT) AS truncated_rows \
             FROM parts WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(D::ex(&mut *self.conn().await?))
        .await?)
    }

    async fn spec_by_hash(&self, hash: &str) -> Result<Option<JobSpec>> {
        let ended = [JobState::Succeeded, JobState::Failed, JobState::Cancelled];
        let json: Option<String> = sqlx::query_scalar(
            "SELECT spec_json FROM jobs WHERE spec_hash = $1 AND state NOT IN ($2, $3, $4) \
             ORDER BY id DESC LIMIT 1",
        )
        .bind(hash)
        .bind(ended[0].as_str())
        .bind(ended[1].as_str())
        .bind(ended[2].as_str())
        .fetch_optional(D::ex(&mut *self.conn().await?))
        .await?;
        json.map(|j| crate::records::parse_spec(&j)).transpose()
    }
}
