//! The lease protocol on PostgreSQL. A claim is one statement that locks pending shards with
//! SKIP LOCKED, so concurrent claimers (on any replica) never wait on each other nor get the
//! same shard. Every later write is guarded by `(id, token, state = 'leased')`; when it touches
//! nothing, `refusal` reads the shard to say why.

use std::collections::{HashMap, HashSet};

use nightshift_proto::wire::{HeartbeatResponse, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use nightshift_proto::{FailureClass, JobSpec, JobState, LeaseState};
use sqlx::{PgExecutor, Row};

use super::{PgStore, job_from_row, parse_spec, parse_state};
use crate::records::{DialectRow, error_threshold_exceeded, parse_secret};
use crate::{ClaimRequest, LeaseHolder, LeaseTiming, Result, StoreError, new_lease_secret};

/// `LeaseTiming::backoff_ms` for 0..=20 attempts (it is flat past 20), as an array that SQL
/// indexes with `[LEAST(GREATEST(attempts, 0), 20) + 1]`, so the formula stays in one place.
pub(super) fn backoff_table(timing: LeaseTiming) -> Vec<i64> {
    (0..=20).map(|a| timing.backoff_ms(a)).collect()
}

/// A count from a worker as BIGINT; past `i64::MAX` it saturates (and then fails the checks)
/// rather than wrapping negative.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The row shards a claimed merge shard covers, if it is one.
fn merge_range(r: &sqlx::postgres::PgRow) -> Result<Option<(i64, i64)>> {
    if r.try_get::<String, _>("kind")? != "merge" {
        return Ok(None);
    }
    Ok(Some((r.try_get("merge_first")?, r.try_get("merge_last")?)))
}

/// A shard as a refused lease write finds it.
struct LeaseRow {
    state: String,
    token: i64,
    checkpoint_rows: i64,
    rows: i64,
    job_id: i64,
    job_state: JobState,
}

async fn lease_row<'e, E: PgExecutor<'e>>(ex: E, shard_id: i64) -> Result<Option<LeaseRow>> {
    let row = sqlx::query(
        "SELECT s.state, s.token, s.checkpoint_rows, s.rows, s.job_id, j.state AS job_state \
         FROM shards s JOIN jobs j ON j.id = s.job_id WHERE s.id = $1",
    )
    .bind(shard_id)
    .fetch_optional(ex)
    .await?;
    row.map(|r| {
        Ok(LeaseRow {
            state: r.try_get("state")?,
            token: r.try_get("token")?,
            checkpoint_rows: r.try_get("checkpoint_rows")?,
            rows: r.try_get("rows")?,
            job_id: r.try_get("job_id")?,
            job_state: parse_state(r.try_get("job_state")?)?,
        })
    })
    .transpose()
}

/// Why a guarded write touched nothing, when the lease itself is the reason: it is no longer
/// held under this token, or its job stopped running. `None` means the lease is fine and the
/// write was refused for its own reason, which the caller names from the row.
fn refusal(row: Option<&LeaseRow>, lease: LeaseRef) -> Option<StoreError> {
    let lost = StoreError::LeaseLost {
        shard_id: lease.shard_id,
        token: lease.token,
    };
    let Some(row) = row else { return Some(lost) };
    if row.state != "leased" || row.token != lease.token {
        return Some(lost);
    }
    (row.job_state != JobState::Running).then_some(StoreError::JobNotRunning {
        job_id: row.job_id,
        state: row.job_state,
    })
}

impl PgStore {
    pub(super) async fn claim_shards(
        &self,
        worker: &str,
        max: u32,
        timing: LeaseTiming,
    ) -> Result<Vec<ShardLease>> {
        let request = ClaimRequest {
            worker: worker.to_string(),
            max,
        };
        let mut answers = self
            .claim_for(std::slice::from_ref(&request), timing)
            .await?;
        Ok(answers.pop().unwrap_or_default())
    }

    /// Claims for several requests in one statement: the shards it takes are handed out in
    /// claim order, the first request's `max` first, then the next one's.
    pub(super) async fn claim_for(
        &self,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>> {
        let mut answers: Vec<Vec<ShardLease>> = vec![Vec::new(); requests.len()];
        let slots: u64 = requests.iter().map(|r| u64::from(r.max)).sum();
        if slots == 0 {
            return Ok(answers);
        }
        // One statement: note the workers, grant the shards, and read what the workers need.
        // `slot` numbers the shards wanted, request by request (`$1` the worker and `$2` the
        // request of each); `picked` numbers the pending shards taken, in claim order; each
        // slot gets the shard of its number.
        //
        // The claim visits the running jobs (few) by priority, and takes each one's pending
        // shards in id order from `shards_job (job_id, state, id)` until it has enough, so it
        // reads about the shards it takes however many are pending. The job list stays a
        // sorted subquery (PostgreSQL does not flatten one with ORDER BY), so the nested loop
        // visits jobs in that order and stops. `state` is matched as a range, not an equality,
        // so the planner cannot treat it as a constant and drop it from ORDER BY: only
        // `shards_job` yields (state, id) order, so no plan can walk the primary key past
        // finished shards when statistics are stale.
        //
        // The limit is written into the text rather than bound: with LIMIT as a parameter the
        // generic plan looks costlier than any custom one, so PostgreSQL would plan the
        // statement afresh on every call (about twice the cost of running it). As a literal,
        // rounded up to a power of two so that few texts exist, each gets its own prepared
        // statement and, after five calls, a cached plan. Shards locked past the last slot are
        // left as they were. Workers are noted in name order, so that two claims never wait on
        // each other's rows in opposite orders.
        let limit = slots.next_power_of_two();
        let sql = format!(
            "WITH slot AS ( \
               SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $5::TEXT[]) WITH ORDINALITY \
                 AS u(worker, request, secret, n) \
             ), seen AS ( \
               INSERT INTO workers (id, last_seen_ms) \
               SELECT w, ns_now_ms() FROM unnest($3::TEXT[]) AS w \
               ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms \
             ), picked AS ( \
               SELECT q.id, row_number() OVER () AS n FROM ( \
                 SELECT p.id FROM ( \
                   SELECT id FROM jobs WHERE state = 'running' ORDER BY priority DESC, id \
                 ) j CROSS JOIN LATERAL ( \
                   SELECT s.id FROM shards s \
                   WHERE s.job_id = j.id AND s.state >= 'pending' AND s.state <= 'pending' \
                     AND s.not_before_ms <= (SELECT ns_now_ms()) \
                   ORDER BY s.state, s.id LIMIT {limit} \
                   FOR UPDATE SKIP LOCKED \
                 ) p \
                 LIMIT {limit} \
               ) q \
             ), claimed AS ( \
               UPDATE shards s SET state = 'leased', token = s.token + 1, \
                 attempts = s.attempts + 1, worker_id = slot.worker, \
                 lease_secret = slot.secret, lease_expires_at_ms = ns_now_ms() + $4 \
               FROM picked JOIN slot ON slot.n = picked.n \
               WHERE s.id = picked.id \
               RETURNING s.id, s.job_id, s.file_index, s.row_group_start, s.row_group_end, \
                 s.file_row_start, s.rows, s.token, s.attempts, s.checkpoint_rows, \
                 s.lease_secret, s.kind, s.merge_first, s.merge_last, slot.request, slot.n \
             ) \
             SELECT c.*, j.uid, j.spec_json, f.uri, f.size, f.etag \
             FROM claimed c JOIN jobs j ON j.id = c.job_id \
             JOIN input_files f ON f.job_id = c.job_id AND f.idx = c.file_index \
             ORDER BY c.n"
        );
        // The slots are spelled out here rather than in SQL (`generate_series` per request):
        // then the generic plan's estimates are close to any call's, PostgreSQL keeps it after
        // five calls, and a claim is not planned afresh each time.
        let mut slot_workers: Vec<&str> = Vec::with_capacity(slots as usize);
        let mut slot_requests: Vec<i64> = Vec::with_capacity(slots as usize);
        let mut slot_secrets: Vec<String> = Vec::with_capacity(slots as usize);
        for (i, r) in requests.iter().enumerate() {
            let secret = new_lease_secret().to_hex();
            for _ in 0..r.max {
                slot_workers.push(&r.worker);
                slot_requests.push(i as i64);
                slot_secrets.push(secret.clone());
            }
        }
        let mut workers: Vec<&str> = requests.iter().map(|r| r.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(slot_workers)
            .bind(slot_requests)
            .bind(workers)
            .bind(timing.ttl_ms)
            .bind(slot_secrets)
            .fetch_all(&self.pool)
            .await?;
        let mut specs: HashMap<i64, JobSpec> = HashMap::new();
        for r in rows {
            let job_id: i64 = r.try_get("job_id")?;
            let spec = match specs.get(&job_id) {
                Some(spec) => spec.clone(),
                None => {
                    let spec = parse_spec(r.try_get("spec_json")?)?;
                    specs.insert(job_id, spec.clone());
                    spec
                }
            };
            let request = usize::try_from(r.try_get::<i64, _>("request")?)
                .ok()
                .filter(|&i| i < answers.len())
                .ok_or_else(|| StoreError::Corrupt("claim answered an unknown request".into()))?;
            answers[request].push(ShardLease {
                job_id,
                job_uid: r.try_get("uid")?,
                shard_id: r.try_get("id")?,
                token: r.try_get("token")?,
                secret: parse_secret(r.try_get("lease_secret")?)?,
                attempt: r.try_get::<i64, _>("attempts")? as u32,
                file: r.input_file()?,
                plan: r.shard_plan()?,
                checkpoint_rows: r.try_get::<i64, _>("checkpoint_rows")? as u64,
                spec,
                merge: match merge_range(&r)? {
                    Some((first, last)) => {
                        Some(super::merges::sources(&self.pool, job_id, first, last).await?)
                    }
                    None => None,
                },
            });
        }
        Ok(answers)
    }

    pub(super) async fn holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        let rows = sqlx::query(
            "SELECT s.id, s.token, s.worker_id, s.lease_secret, s.rows, j.uid, j.output_uri \
             FROM shards s JOIN jobs j ON j.id = s.job_id \
             WHERE s.id = ANY($1) AND s.state = 'leased'",
        )
        .bind(shard_ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.holder()).collect()
    }

    /// One statement for all of a worker's leases. It changes only `lease_expires_at_ms`,
    /// which no index holds, so the updates stay HOT.
    pub(super) async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        let ids: Vec<i64> = leases.iter().map(|l| l.shard_id).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
        // The final SELECT sees the rows as they were before `held` ran; a lease that `held`
        // skipped is cancelled only if it was still ours and its job had stopped.
        let rows = sqlx::query(
            "WITH seen AS ( \
               INSERT INTO workers (id, last_seen_ms) VALUES ($1, ns_now_ms()) \
               ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms \
             ), req AS ( \
               SELECT * FROM unnest($2::BIGINT[], $3::BIGINT[]) WITH ORDINALITY \
                 AS r(shard_id, token, ord) \
             ), held AS ( \
               UPDATE shards s SET lease_expires_at_ms = ns_now_ms() + $4 \
               FROM req r, jobs j \
               WHERE s.id = r.shard_id AND s.token = r.token AND s.state = 'leased' \
                 AND j.id = s.job_id AND j.state = 'running' \
               RETURNING s.id, s.token \
             ) \
             SELECT r.shard_id, r.token, \
               CASE WHEN h.id IS NOT NULL THEN 'held' \
                    WHEN s.state = 'leased' AND s.token = r.token AND j.state <> 'running' \
                      THEN 'cancelled' \
                    ELSE 'lost' END AS lease_state \
             FROM req r \
             LEFT JOIN held h ON h.id = r.shard_id AND h.token = r.token \
             LEFT JOIN shards s ON s.id = r.shard_id \
             LEFT JOIN jobs j ON j.id = s.job_id \
             ORDER BY r.ord",
        )
        .bind(worker)
        .bind(ids)
        .bind(tokens)
        .bind(timing.ttl_ms)
        .fetch_all(&self.pool)
        .await?;
        let leases = rows
            .iter()
            .map(|r| {
                Ok(LeaseStatus {
                    shard_id: r.try_get("shard_id")?,
                    token: r.try_get("token")?,
                    state: parse_state::<LeaseState>(r.try_get("lease_state")?)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(HeartbeatResponse { leases })
    }

    /// Moves the checkpoint past `part` and records it, in one transaction. The part must
    /// start exactly at the checkpoint and stay inside the shard.
    pub(super) async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let job_id: Option<i64> = sqlx::query_scalar(
            "UPDATE shards s SET checkpoint_rows = s.checkpoint_rows + $3, \
               error_rows = s.error_rows + $4 \
             FROM jobs j \
             WHERE s.id = $1 AND s.token = $2 AND s.state = 'leased' \
               AND j.id = s.job_id AND j.state = 'running' \
               AND s.checkpoint_rows = $5 AND $3 > 0 AND $6 <= s.rows \
             RETURNING s.job_id",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .bind(clamp(part.rows))
        .bind(clamp(part.error_rows))
        .bind(clamp(part.row_start))
        .bind(clamp(part.row_start.saturating_add(part.rows)))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job_id) = job_id else {
            let row = lease_row(&mut *tx, lease.shard_id).await?;
            return Err(
                refusal(row.as_ref(), lease).unwrap_or(StoreError::CheckpointGap {
                    shard_id: lease.shard_id,
                    expected: row.map_or(0, |r| r.checkpoint_rows as u64),
                    got: part.row_start,
                }),
            );
        };
        sqlx::query(
            "INSERT INTO parts (job_id, shard_id, token, row_start, rows, bytes, uri, \
             error_rows, error_uri, error_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(job_id)
        .bind(lease.shard_id)
        .bind(lease.token)
        .bind(clamp(part.row_start))
        .bind(clamp(part.rows))
        .bind(clamp(part.bytes))
        .bind(&part.uri)
        .bind(clamp(part.error_rows))
        .bind(&part.error_uri)
        .bind(clamp(part.error_bytes))
        .execute(&mut *tx)
        .await?;
        if part.error_rows > 0 {
            // Lock the job first, so two checkpoints with poison rows count one after the other
            // and cannot both miss the threshold.
            let row = sqlx::query(concat!(
                "SELECT ",
                job_cols!(),
                " FROM jobs WHERE id = $1 FOR NO KEY UPDATE"
            ))
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
            let job = job_from_row(&row)?;
            let errors: i64 = sqlx::query_scalar(
                "SELECT COALESCE(SUM(error_rows), 0)::BIGINT FROM shards \
                 WHERE job_id = $1 AND kind = 'rows'",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(message) = error_threshold_exceeded(&job, errors as u64) {
                sqlx::query(
                    "UPDATE jobs SET state = 'failed', error = $1, finished_at_ms = ns_now_ms() \
                     WHERE id = $2 AND state = 'running'",
                )
                .bind(message)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A shard is done once every row is checkpointed. Completing a shard of a job that
    /// stopped meanwhile is not the worker's error.
    pub(super) async fn finish_shard(&self, lease: LeaseRef) -> Result<()> {
        let n = sqlx::query(
            "UPDATE shards SET state = 'done', lease_expires_at_ms = NULL, worker_id = NULL \
             WHERE id = $1 AND token = $2 AND state = 'leased' AND checkpoint_rows = rows",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n > 0 {
            return Ok(());
        }
        self.completion_refused(lease).await?
    }

    /// `finish_shard` for several leases in one statement; only the leases it did not finish
    /// cost a read each, to say why.
    pub(super) async fn finish_shards(&self, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = leases.iter().map(|l| l.shard_id).collect();
        let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
        let finished: Vec<bool> = sqlx::query_scalar(
            "WITH req AS ( \
               SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[]) WITH ORDINALITY \
                 AS r(shard_id, token, ord) \
             ), done AS ( \
               UPDATE shards s SET state = 'done', lease_expires_at_ms = NULL, worker_id = NULL \
               FROM req r \
               WHERE s.id = r.shard_id AND s.token = r.token AND s.state = 'leased' \
                 AND s.checkpoint_rows = s.rows \
               RETURNING s.id, s.token \
             ) \
             SELECT EXISTS (SELECT 1 FROM done d WHERE d.id = r.shard_id AND d.token = r.token) \
             FROM req r ORDER BY r.ord",
        )
        .bind(ids)
        .bind(tokens)
        .fetch_all(&self.pool)
        .await?;
        let mut answers = Vec::with_capacity(leases.len());
        let mut seen = HashSet::with_capacity(leases.len());
        for (&lease, finished) in leases.iter().zip(finished) {
            // A lease named again answers as a second `complete` would: the first one took it.
            let first = seen.insert(lease);
            answers.push(match (finished, first) {
                (true, true) => Ok(()),
                (true, false) => Err(StoreError::LeaseLost {
                    shard_id: lease.shard_id,
                    token: lease.token,
                }),
                (false, _) => self.completion_refused(lease).await?,
            });
        }
        Ok(answers)
    }

    /// What a completion the guarded update refused answers: fine when the job stopped,
    /// otherwise why the lease could not complete. The outer result is the read's own.
    async fn completion_refused(&self, lease: LeaseRef) -> Result<Result<()>> {
        let row = lease_row(&self.pool, lease.shard_id).await?;
        Ok(match refusal(row.as_ref(), lease) {
            Some(StoreError::JobNotRunning { .. }) => Ok(()),
            Some(e) => Err(e),
            None => Err(StoreError::Incomplete {
                shard_id: lease.shard_id,
                done: row.as_ref().map_or(0, |r| r.checkpoint_rows as u64),
                rows: row.as_ref().map_or(0, |r| r.rows as u64),
            }),
        })
    }

    /// Retryable failures go back to pending after a backoff, until the job's max attempts;
    /// permanent ones are dead at once.
    pub(super) async fn fail_shard(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        let n = sqlx::query(
            "UPDATE shards s SET \
               state = CASE WHEN $3 OR s.attempts >= j.max_attempts THEN 'dead' \
                            ELSE 'pending' END, \
               not_before_ms = ns_now_ms() + ($4::BIGINT[])[LEAST(GREATEST(s.attempts, 0), 20) + 1], \
               worker_id = NULL, lease_expires_at_ms = NULL, error = $5, error_class = $6 \
             FROM jobs j \
             WHERE s.id = $1 AND s.token = $2 AND s.state = 'leased' AND j.id = s.job_id",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .bind(class == FailureClass::Permanent)
        .bind(backoff_table(timing))
        .bind(message)
        .bind(class.as_str())
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

    /// Gives the shard back with its checkpoint; the grant does not count as an attempt.
    pub(super) async fn release_shard(&self, lease: LeaseRef) -> Result<()> {
        let n = sqlx::query(
            "UPDATE shards SET state = 'pending', attempts = GREATEST(attempts - 1, 0), \
             worker_id = NULL, lease_expires_at_ms = NULL, not_before_ms = 0 \
             WHERE id = $1 AND token = $2 AND state = 'leased'",
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
}
