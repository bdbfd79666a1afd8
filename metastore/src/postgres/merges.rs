//! Merge work on PostgreSQL: what the planner reads, the merges it creates (once per first
//! shard, whichever replica plans them), the parts a merge rewrites, and the merged files.

use nightshift_proto::wire::PartRecord;
use sqlx::PgExecutor;

use super::PgStore;
use crate::merges::{MergeCandidate, MergeGroup};
use crate::records::{DialectRow, PART_COLUMNS};
use crate::{PartRow, Result};

/// The parts of row shards `[first, last]` of a job, in row order.
pub(super) async fn sources<'e, E: PgExecutor<'e>>(
    ex: E,
    job_id: i64,
    first: i64,
    last: i64,
) -> Result<Vec<PartRecord>> {
    let sql = format!(
        "SELECT {PART_COLUMNS} FROM parts p JOIN shards s ON s.id = p.shard_id \
         WHERE s.job_id = $1 AND s.kind = 'rows' AND s.id BETWEEN $2 AND $3 \
         ORDER BY s.id, p.row_start"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .bind(first)
        .bind(last)
        .fetch_all(ex)
        .await?;
    rows.iter().map(|r| Ok(r.part()?.record())).collect()
}

impl PgStore {
    /// Row shards after the last one a merge covers (merges are made in row order).
    pub(super) async fn candidates(&self, job_id: i64) -> Result<Vec<MergeCandidate>> {
        let rows = sqlx::query(
            "SELECT s.id, s.state = 'done' AS done, \
               (SELECT COALESCE(SUM(p.bytes + p.error_bytes), 0)::BIGINT FROM parts p \
                 WHERE p.shard_id = s.id) AS bytes \
             FROM shards s WHERE s.job_id = $1 AND s.kind = 'rows' \
               AND s.id > COALESCE((SELECT MAX(m.merge_last) FROM shards m \
                 WHERE m.job_id = $1 AND m.kind = 'merge'), 0) \
             ORDER BY s.id",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.merge_candidate()).collect()
    }

    pub(super) async fn insert_merges(&self, job_id: i64, groups: &[MergeGroup]) -> Result<u64> {
        let mut made = 0;
        for g in groups {
            made += sqlx::query(
                "INSERT INTO shards (job_id, kind, merge_first, merge_last, file_index, \
                   row_group_start, row_group_end, file_row_start, rows) \
                 SELECT $1, 'merge', $2, $3, MIN(file_index), 0, 0, 0, SUM(rows) FROM shards \
                 WHERE job_id = $1 AND kind = 'rows' AND id BETWEEN $2 AND $3 \
                   AND EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND state = 'running') \
                 HAVING COUNT(*) > 0 \
                 ON CONFLICT DO NOTHING",
            )
            .bind(job_id)
            .bind(g.first)
            .bind(g.last)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(made)
    }

    /// The parts merge work wrote: the job's output files, in row order.
    pub(super) async fn merged(&self, job_id: i64) -> Result<Vec<PartRow>> {
        let sql = format!(
            "SELECT {PART_COLUMNS} FROM parts p JOIN shards s ON s.id = p.shard_id \
             WHERE s.job_id = $1 AND s.kind = 'merge' ORDER BY s.merge_first, p.row_start"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.part()).collect()
    }
}
