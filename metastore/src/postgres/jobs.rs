//! Jobs on PostgreSQL: submission (idempotent, bulk-inserted), reads, cancel and retry.

use nightshift_proto::JobState;

use super::{PgStore, job_from_row, job_in};
use crate::records::{DialectRow, PART_COLUMNS, SHARD_COLUMNS, ShardTally};
use crate::{JobRecord, NewJob, PartRow, Result, ShardRow, StoreError, Submitted, output_key};

/// Times `insert_job` re-reads a key another replica inserted and then deleted under it.
const KEY_RACE_TRIES: usize = 3;
/// A job of at least this many shards may refresh the shards table's statistics at once.
const ANALYZE_MIN_SHARDS: usize = 1_000;
/// ... when its shards are at least this fraction of the rows the statistics last counted
/// (autovacuum's own default threshold for analysing a table).
const ANALYZE_FRACTION: f64 = 0.1;

/// The advisory lock that serialises the output check and insert of submissions and retries,
/// so two racing submissions cannot both find an output free.
const OUTPUT_LOCK: i64 = 0x6e73_6f75_7470_7574;

/// Takes the output lock until `tx` ends.
async fn lock_outputs(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(OUTPUT_LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The first job, other than `except`, that is not cancelled and owns an output overlapping
/// `uri`'s (see `output_key`), as the refusal to give. Call under `lock_outputs`.
async fn output_conflict(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    uri: &str,
    except: i64,
) -> Result<Option<StoreError>> {
    let row = sqlx::query(
        "SELECT id, name, output_uri FROM jobs \
         WHERE state <> 'cancelled' AND id <> $2 \
           AND (starts_with($1, output_key) OR starts_with(output_key, $1)) \
         ORDER BY id LIMIT 1",
    )
    .bind(output_key(uri))
    .bind(except)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| r.output_taken(uri)).transpose()
}

/// What an idempotency key that already names `existing` means for a submission of `hash`.
fn same_key(existing: JobRecord, key: &str, hash: &str) -> Result<Submitted> {
    if existing.spec_hash == hash {
        Ok(Submitted::Existing(existing))
    } else {
        Err(StoreError::IdempotencyConflict {
            key: key.to_owned(),
            job_id: existing.id,
        })
    }
}

impl PgStore {
    /// Inserts a job with its input files and shards in one transaction. Files and shards go in
    /// as arrays (one statement each, whatever the shard count). Two replicas racing the same
    /// idempotency key meet on its unique index: the loser's insert does nothing and it answers
    /// with the winner's job.
    pub(super) async fn insert_job(&self, job: NewJob) -> Result<Submitted> {
        let hash = job.spec.hash();
        if let Some(key) = &job.idempotency_key
            && let Some(existing) = self.job_by_key_in(key).await?
        {
            return same_key(existing, key, &hash);
        }
        let spec_json = serde_json::to_string(&job.spec)
            .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?;
        for _ in 0..KEY_RACE_TRIES {
            let mut tx = self.pool.begin().await?;
            // Under the lock a racing submission of the same key has committed or not begun:
            // look for its job again before judging the output.
            lock_outputs(&mut tx).await?;
            if let Some(key) = &job.idempotency_key
                && let Some(existing) = self.job_by_key_in(key).await?
            {
                return same_key(existing, key, &hash);
            }
            if let Some(taken) = output_conflict(&mut tx, &job.spec.output.uri, 0).await? {
                return Err(taken);
            }
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO jobs (uid, name, idempotency_key, spec_json, spec_hash, state, \
                 priority, max_attempts, rows_total, output_uri, output_key, created_at_ms, \
                 started_at_ms) \
                 SELECT $1, $2, $3, $4, $5, 'running', $6, $7, $8, $9, $10, t.now, t.now \
                 FROM (SELECT ns_now_ms() AS now) t \
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            )
            .bind(&job.uid)
            .bind(&job.spec.name)
            .bind(&job.idempotency_key)
            .bind(&spec_json)
            .bind(&hash)
            .bind(i64::from(job.spec.priority))
            .bind(i64::from(job.spec.retry.max_attempts))
            .bind(job.plan.rows_total as i64)
            .bind(&job.spec.output.uri)
            .bind(output_key(&job.spec.output.uri))
            .fetch_optional(&mut *tx)
            .await?;
            let Some(id) = id else {
                // Only the idempotency key can make the insert do nothing. Each statement reads
                // what is committed when it starts, so this one sees the winner's job.
                let Some(key) = &job.idempotency_key else {
                    return Err(StoreError::Corrupt(
                        "job insert did nothing without an idempotency key".into(),
                    ));
                };
                let row = sqlx::query(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM jobs WHERE idempotency_key = $1"
                ))
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
                tx.rollback().await?;
                match row {
                    Some(row) => return same_key(job_from_row(&row)?, key, &hash),
                    // The winner's job was deleted meanwhile: try again.
                    None => continue,
                }
            };
            self.insert_plan(&mut tx, id, &job).await?;
            let record = job_in(&mut *tx, id)
                .await?
                .ok_or(StoreError::JobNotFound(id))?;
            tx.commit().await?;
            self.refresh_statistics(job.plan.shards.len()).await;
            return Ok(Submitted::Created(record));
        }
        Err(StoreError::Corrupt(format!(
            "idempotency key {:?} kept changing hands during submission",
            job.idempotency_key
        )))
    }

    /// A job that is a large part of the shards table changes what the planner should expect
    /// of it. Autovacuum notices within about a minute; until then claims would be planned
    /// for a table that is no longer there (a never-analysed table looks empty, and a claim
    /// planned for an empty table sorts every pending shard). So refresh the statistics now.
    /// The job is committed already: a failure here is logged, not returned.
    async fn refresh_statistics(&self, new_shards: usize) {
        if new_shards < ANALYZE_MIN_SHARDS {
            return;
        }
        let analyzed = async {
            let counted: f32 =
                sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'shards'::regclass")
                    .fetch_one(&self.pool)
                    .await?;
            // -1: never analysed.
            if counted < 0.0 || new_shards as f64 >= ANALYZE_FRACTION * f64::from(counted) {
                sqlx::query("ANALYZE shards").execute(&self.pool).await?;
            }
            Ok::<_, sqlx::Error>(())
        };
        if let Err(e) = analyzed.await {
            tracing::warn!(error = %e, "refreshing the shards table's statistics failed");
        }
    }

    async fn insert_plan(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        id: i64,
        job: &NewJob,
    ) -> Result<()> {
        let files = &job.plan.files;
        sqlx::query(
            "INSERT INTO input_files (job_id, idx, uri, size, etag) \
             SELECT $1, f.ord - 1, f.uri, f.size, f.etag \
             FROM unnest($2::TEXT[], $3::BIGINT[], $4::TEXT[]) WITH ORDINALITY \
                  AS f(uri, size, etag, ord)",
        )
        .bind(id)
        .bind(files.iter().map(|f| f.uri.as_str()).collect::<Vec<_>>())
        .bind(files.iter().map(|f| f.size as i64).collect::<Vec<_>>())
        .bind(files.iter().map(|f| f.etag.as_deref()).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
        let shards = &job.plan.shards;
        let column = |f: fn(&nightshift_proto::wire::ShardPlan) -> i64| -> Vec<i64> {
            shards.iter().map(f).collect()
        };
        // Ordered by position in the plan, so shard ids follow the plan.
        sqlx::query(
            "INSERT INTO shards (job_id, file_index, row_group_start, row_group_end, \
             file_row_start, rows) \
             SELECT $1, s.file_index, s.rg_start, s.rg_end, s.row_start, s.rows \
             FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[]) \
                  WITH ORDINALITY AS s(file_index, rg_start, rg_end, row_start, rows, ord) \
             ORDER BY s.ord",
        )
        .bind(id)
        .bind(column(|s| i64::from(s.file_index)))
        .bind(column(|s| i64::from(s.row_group_start)))
        .bind(column(|s| i64::from(s.row_group_end)))
        .bind(column(|s| s.file_row_start as i64))
        .bind(column(|s| s.rows as i64))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub(super) async fn job_by_key_in(&self, key: &str) -> Result<Option<JobRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn counts(&self, job_id: i64) -> Result<ShardTally> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(checkpoint_rows), 0)::BIGINT AS done, \
             COALESCE(SUM(error_rows), 0)::BIGINT AS errors \
             FROM shards WHERE job_id = $1 AND kind = 'rows' GROUP BY state",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut tally = ShardTally::default();
        for row in &rows {
            row.shard_tally(&mut tally)?;
        }
        Ok(tally)
    }

    pub(super) async fn shard_rows(&self, job_id: i64) -> Result<Vec<ShardRow>> {
        let sql = format!(
            "SELECT {SHARD_COLUMNS} FROM shards WHERE job_id = $1 AND kind = 'rows' ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.shard_row()).collect()
    }

    pub(super) async fn part_rows(&self, job_id: i64) -> Result<Vec<PartRow>> {
        let sql = format!(
            "SELECT {PART_COLUMNS} FROM parts p WHERE p.job_id = $1 \
             ORDER BY p.shard_id, p.row_start"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| r.part()).collect()
    }

    /// One guarded statement; a job already cancelled answers as it is.
    pub(super) async fn cancel(&self, id: i64) -> Result<JobRecord> {
        let row = sqlx::query(concat!(
            "UPDATE jobs SET state = 'cancelled', finished_at_ms = ns_now_ms(), \
             finalizer_owner = NULL, finalizer_expires_at_ms = NULL \
             WHERE id = $1 AND state IN ('pending', 'planning', 'running', 'finalizing') \
             RETURNING ",
            job_cols!()
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return job_from_row(&row);
        }
        let job = job_in(&self.pool, id)
            .await?
            .ok_or(StoreError::JobNotFound(id))?;
        match job.state {
            JobState::Cancelled => Ok(job),
            state => Err(StoreError::BadTransition {
                job_id: id,
                state,
                action: "cancel",
            }),
        }
    }

    /// Dead shards go back to pending with fresh attempts; checkpoints stay.
    pub(super) async fn retry(&self, id: i64) -> Result<JobRecord> {
        let mut tx = self.pool.begin().await?;
        // NO KEY UPDATE: blocks other job transitions, not workers inserting parts.
        let row = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE id = $1 FOR NO KEY UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let job = row
            .as_ref()
            .map(job_from_row)
            .transpose()?
            .ok_or(StoreError::JobNotFound(id))?;
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            return Err(StoreError::BadTransition {
                job_id: id,
                state: job.state,
                action: "retry",
            });
        }
        if job.state == JobState::Cancelled {
            lock_outputs(&mut tx).await?;
            if let Some(taken) = output_conflict(&mut tx, &job.output_uri, id).await? {
                return Err(taken);
            }
        }
        sqlx::query(
            "UPDATE shards SET state = 'pending', attempts = 0, not_before_ms = 0, error = NULL, \
             error_class = NULL WHERE job_id = $1 AND state = 'dead'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(concat!(
            "UPDATE jobs SET state = 'running', error = NULL, finished_at_ms = NULL, \
             finalizer_owner = NULL, finalizer_expires_at_ms = NULL WHERE id = $1 RETURNING ",
            job_cols!()
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let job = job_from_row(&row)?;
        tx.commit().await?;
        Ok(job)
    }
}
