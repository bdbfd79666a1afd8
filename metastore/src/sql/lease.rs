//! The lease protocol. Every write is one statement guarded by `(shard, token, leased)`; when
//! it touches nothing, the shard is read back and `rules` says why. Several requests at once
//! are the dialect's own (`Dialect::claim_many` and the others): SQLite takes them one at a
//! time, PostgreSQL set-based.

use std::collections::HashMap;

use async_trait::async_trait;
use nightshift_proto::wire::{HeartbeatResponse, LeaseRef, LeaseStatus, PartRecord, ShardLease};
use nightshift_proto::{FailureClass, JobSpec, JobState, LeaseState, ShardState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Conn, Dialect, RowOf, SqlStore, Value};
use crate::Leases;
use crate::records::{Granted, LeaseRow, PartRow, parse_spec};
use crate::rules::{self, ShardKind};
use crate::{ClaimRequest, HeartbeatLot, LeaseHolder, LeaseTiming, Result, StoreError};

/// The columns of a held shard the lease check reads, over shard `s` and job `j`.
pub(crate) const HOLDER: &str = "SELECT s.id, s.token, s.worker_id, s.lease_secret, s.rows, \
     s.output_file, s.error_file, j.uid, j.output_uri \
     FROM shards s JOIN jobs j ON j.id = s.job_id";

#[async_trait]
impl<D: Dialect> Leases for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    async fn claim(&self, worker: &str, max: u32, timing: LeaseTiming) -> Result<Vec<ShardLease>> {
        let request = ClaimRequest {
            worker: worker.to_string(),
            max,
        };
        let mut answers = D::claim_many(self, std::slice::from_ref(&request), timing).await?;
        Ok(answers.pop().unwrap_or_default())
    }

    async fn claim_many(
        &self,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Result<Vec<ShardLease>>>> {
        let answers = D::claim_many(self, requests, timing).await?;
        Ok(answers.into_iter().map(Ok).collect())
    }

    async fn lease_holders(&self, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        D::lease_holders(self, shard_ids).await
    }

    async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
        timing: LeaseTiming,
    ) -> Result<HeartbeatResponse> {
        let lot = HeartbeatLot {
            worker: worker.to_string(),
            leases: leases.to_vec(),
        };
        let mut answers = D::heartbeat_many(self, std::slice::from_ref(&lot), timing).await?;
        Ok(HeartbeatResponse {
            leases: answers.pop().unwrap_or_default(),
            drain: false,
        })
    }

    async fn heartbeat_many(
        &self,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>> {
        D::heartbeat_many(self, requests, timing).await
    }

    /// Moves the checkpoint past `part` and records it, in one transaction. The part must
    /// start exactly at the checkpoint and stay inside the shard.
    async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<()> {
        let mut answers = D::checkpoint_many(self, &[(lease, part.clone())]).await?;
        answers.pop().unwrap_or(Ok(()))
    }

    async fn checkpoint_many(
        &self,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>> {
        D::checkpoint_many(self, checkpoints).await
    }

    /// A shard is done once every row is checkpointed.
    async fn complete(&self, lease: LeaseRef) -> Result<()> {
        let mut conn = self.conn().await?;
        let done = sqlx::query(
            "UPDATE shards SET state = $3, lease_expires_at_ms = NULL, worker_id = NULL \
             WHERE id = $1 AND token = $2 AND state = $4 AND checkpoint_rows = rows",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .bind(ShardState::Done.as_str())
        .bind(ShardState::Leased.as_str())
        .execute(D::ex(&mut conn))
        .await?;
        if D::affected(&done) > 0 {
            return Ok(());
        }
        rules::completion_refused(
            Self::lease_row(&mut conn, lease.shard_id).await?.as_ref(),
            lease,
        )
    }

    async fn complete_many(&self, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        D::complete_many(self, leases).await
    }

    /// Retryable failures go back to pending after a backoff, until the job's max attempts;
    /// permanent ones are dead at once.
    async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        timing: LeaseTiming,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE shards AS s SET {} FROM jobs AS j \
             WHERE s.id = $6 AND s.token = $7 AND s.state = $8 AND j.id = s.job_id",
            rules::end_grant_sql(timing)
        );
        let failed = sqlx::query(D::sql(&sql))
            .bind(class == FailureClass::Permanent)
            .bind(ShardState::Dead.as_str())
            .bind(ShardState::Pending.as_str())
            .bind(message)
            .bind(class.as_str())
            .bind(lease.shard_id)
            .bind(lease.token)
            .bind(ShardState::Leased.as_str())
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        lost_unless(D::affected(&failed), lease)
    }

    /// Gives the shard back with its checkpoint; the grant does not count as an attempt.
    async fn release(&self, lease: LeaseRef) -> Result<()> {
        let released = sqlx::query(
            "UPDATE shards SET state = $3, \
               attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
               worker_id = NULL, lease_expires_at_ms = NULL, not_before_ms = 0 \
             WHERE id = $1 AND token = $2 AND state = $4",
        )
        .bind(lease.shard_id)
        .bind(lease.token)
        .bind(ShardState::Pending.as_str())
        .bind(ShardState::Leased.as_str())
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        lost_unless(D::affected(&released), lease)
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
    /// A lease's answer to a heartbeat: held when the heartbeat extended it, else why not
    /// (the shard read back, `rules::unextended`).
    pub(crate) async fn heartbeat_status(
        conn: &mut Conn<D>,
        lease: LeaseRef,
        extended: bool,
    ) -> Result<LeaseStatus> {
        let state = if extended {
            LeaseState::Held
        } else {
            rules::unextended(Self::lease_row(conn, lease.shard_id).await?.as_ref(), lease)
        };
        Ok(LeaseStatus {
            shard_id: lease.shard_id,
            token: lease.token,
            state,
        })
    }

    /// The shard as a refused write finds it.
    pub(crate) async fn lease_row(conn: &mut Conn<D>, shard_id: i64) -> Result<Option<LeaseRow>> {
        Ok(sqlx::query_as(
            "SELECT s.state, s.token, s.checkpoint_rows, s.rows, s.job_id, j.state AS job_state \
             FROM shards s JOIN jobs j ON j.id = s.job_id WHERE s.id = $1",
        )
        .bind(shard_id)
        .fetch_optional(D::ex(conn))
        .await?)
    }

    /// The leases to hand out for shards just granted: each job's spec parsed once, and the
    /// parts each merge shard rewrites.
    pub(crate) async fn leases(
        conn: &mut Conn<D>,
        granted: Vec<Granted>,
    ) -> Result<Vec<ShardLease>> {
        let mut specs: HashMap<i64, JobSpec> = HashMap::new();
        let mut leases = Vec::with_capacity(granted.len());
        for g in granted {
            let spec = match specs.get(&g.job_id) {
                Some(spec) => spec.clone(),
                None => specs
                    .entry(g.job_id)
                    .or_insert(parse_spec(&g.spec_json)?)
                    .clone(),
            };
            let merge = match g.merge_range()? {
                Some((first, last)) => {
                    Some(Self::merge_sources(conn, g.job_id, first, last).await?)
                }
                None => None,
            };
            leases.push(g.lease(spec, merge)?);
        }
        Ok(leases)
    }

    /// The parts of row shards `[first, last]` of a job, in row order.
    async fn merge_sources(
        conn: &mut Conn<D>,
        job_id: i64,
        first: i64,
        last: i64,
    ) -> Result<Vec<PartRecord>> {
        let sql = D::sql(
            "SELECT {part} FROM parts p JOIN shards s ON s.id = p.shard_id \
             WHERE s.job_id = $1 AND s.kind = $2 AND s.id BETWEEN $3 AND $4 \
             ORDER BY s.id, p.row_start",
        );
        let parts: Vec<PartRow> = sqlx::query_as(sql)
            .bind(job_id)
            .bind(ShardKind::Rows.as_str())
            .bind(first)
            .bind(last)
            .fetch_all(D::ex(conn))
            .await?;
        Ok(parts.iter().map(PartRow::record).collect())
    }

    /// The grant of a shard just leased, with its job and file.
    pub(crate) async fn granted(conn: &mut Conn<D>, id: i64) -> Result<Granted> {
        Ok(sqlx::query_as(D::sql(
            "SELECT {granted} FROM shards s JOIN jobs j ON j.id = s.job_id \
             JOIN input_files f ON f.job_id = s.job_id AND f.idx = s.file_index \
             WHERE s.id = $1",
        ))
        .bind(id)
        .fetch_one(D::ex(conn))
        .await?)
    }

    /// Fails a running job whose poison rows passed its threshold. The job row is locked
    /// first, so two checkpoints with poison rows count one after the other and cannot both
    /// miss the threshold.
    pub(crate) async fn check_error_rows(conn: &mut Conn<D>, job_id: i64) -> Result<()> {
        let job = sqlx::query_as(D::sql("SELECT {job} FROM jobs WHERE id = $1{lock_row}"))
            .bind(job_id)
            .fetch_optional(D::ex(conn))
            .await?
            .ok_or(StoreError::JobNotFound(job_id))?;
        let errors: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(error_rows), 0) AS BIGINT) FROM shards \
             WHERE job_id = $1 AND kind = $2",
        )
        .bind(job_id)
        .bind(ShardKind::Rows.as_str())
        .fetch_one(D::ex(conn))
        .await?;
        if let Some(message) = rules::error_threshold_exceeded(&job, errors.max(0) as u64) {
            Self::fail_running_job(conn, job_id, &message).await?;
        }
        Ok(())
    }

    /// A running job fails with `message`; answers whether it was running.
    pub(super) async fn fail_running_job(
        conn: &mut Conn<D>,
        job_id: i64,
        message: &str,
    ) -> Result<u64> {
        let done = sqlx::query(D::sql(
            "UPDATE jobs SET state = $1, error = $2, finished_at_ms = {now} \
             WHERE id = $3 AND state = $4",
        ))
        .bind(JobState::Failed.as_str())
        .bind(message)
        .bind(job_id)
        .bind(JobState::Running.as_str())
        .execute(D::ex(conn))
        .await?;
        Ok(D::affected(&done))
    }
}

/// A guarded write that changed nothing lost its lease.
fn lost_unless(changed: u64, lease: LeaseRef) -> Result<()> {
    if changed > 0 {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            shard_id: lease.shard_id,
            token: lease.token,
        })
    }
}
