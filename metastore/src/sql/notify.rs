//! Completion callbacks: one per job that names a URL, made with the job, taken for a try
//! once the job has ended (by one replica at a time: a try holds it for a while), and recorded
//! per attempt. A retried job's callback is pending again, and an answer to a try made before
//! the retry no longer settles it (the attempt number fences it).

use async_trait::async_trait;
use nightshift_proto::wire::NotifyView;
use nightshift_proto::{JobSpec, JobState, NotifyState};
use sqlx::{ColumnIndex, Encode, Type};

use super::{Conn, Dialect, RowOf, SqlStore, Value};
use crate::Callbacks;
use crate::{DueNotification, NotifyOutcome, Result};

/// Jobs in these states have ended: their callback may go.
const ENDED: [JobState; 3] = [JobState::Succeeded, JobState::Failed, JobState::Cancelled];

/// Stands for "no answer" in a bound status (the column is NULL then).
const NO_STATUS: i64 = -1;

/// A callback and its last attempt, as the job's status shows it.
#[derive(sqlx::FromRow)]
struct NotifyRow {
    url: String,
    #[sqlx(try_from = "String")]
    state: NotifyState,
    #[sqlx(try_from = "i64")]
    attempts: u32,
    last_status: Option<i64>,
    last_error: Option<String>,
}

#[async_trait]
impl<D: Dialect> Callbacks for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// Takes up to `limit` callbacks of ended jobs that are due, each for one try held for
    /// `hold_ms`, oldest due first.
    async fn claim_notifications(&self, limit: u32, hold_ms: i64) -> Result<Vec<DueNotification>> {
        let mut query = sqlx::query_as(D::sql(
            "UPDATE notifications SET attempts = attempts + 1, next_at_ms = {now} + $1 \
             WHERE job_id IN (SELECT n.job_id FROM notifications n \
               WHERE n.state = $2 AND n.next_at_ms <= {now} \
                 AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = n.job_id AND j.state IN ($4, $5, $6)) \
               ORDER BY n.next_at_ms, n.job_id LIMIT $3{skip_locked}) \
             RETURNING job_id, url, attempts AS attempt",
        ))
        .bind(hold_ms)
        .bind(NotifyState::Pending.as_str())
        .bind(i64::from(limit));
        for state in ENDED {
            query = query.bind(state.as_str());
        }
        Ok(query.fetch_all(D::ex(&mut *self.conn().await?)).await?)
    }

    /// Records a try's answer and settles the callback by it, unless the job was retried since
    /// the try was taken. Answers whether it settled.
    async fn record_notification(
        &self,
        job_id: i64,
        attempt: u32,
        outcome: &NotifyOutcome,
    ) -> Result<bool> {
        let (state, status, error, retry_in_ms) = match outcome {
            NotifyOutcome::Delivered { status } => (NotifyState::Delivered, Some(*status), None, 0),
            NotifyOutcome::Failed {
                status,
                error,
                retry_in_ms,
            } => match retry_in_ms {
                Some(ms) => (NotifyState::Pending, *status, error.as_deref(), *ms),
                None => (NotifyState::Abandoned, *status, error.as_deref(), 0),
            },
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(D::sql(
            "INSERT INTO notification_attempts (job_id, attempt, at_ms, status, error) \
             VALUES ($1, $2, {now}, NULLIF($3, $5), $4)",
        ))
        .bind(job_id)
        .bind(i64::from(attempt))
        .bind(status.map_or(NO_STATUS, i64::from))
        .bind(error)
        .bind(NO_STATUS)
        .execute(D::ex(&mut tx))
        .await?;
        let settled = sqlx::query(D::sql(
            "UPDATE notifications SET state = $3, next_at_ms = {now} + $4 \
             WHERE job_id = $1 AND attempts = $2 AND state = $5",
        ))
        .bind(job_id)
        .bind(i64::from(attempt))
        .bind(state.as_str())
        .bind(retry_in_ms)
        .bind(NotifyState::Pending.as_str())
        .execute(D::ex(&mut tx))
        .await?;
        tx.commit().await?;
        Ok(D::affected(&settled) > 0)
    }

    /// The job's callback and its last attempt, if it has one.
    async fn notification(&self, job_id: i64) -> Result<Option<NotifyView>> {
        let row: Option<NotifyRow> = sqlx::query_as(
            "SELECT n.url, n.state, n.attempts, a.status AS last_status, a.error AS last_error \
             FROM notifications n LEFT JOIN notification_attempts a ON a.id = \
               (SELECT MAX(l.id) FROM notification_attempts l WHERE l.job_id = n.job_id) \
             WHERE n.job_id = $1",
        )
        .bind(job_id)
        .fetch_optional(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(row.map(|r| NotifyView {
            url: r.url,
            state: r.state,
            attempts: r.attempts,
            last_status: r.last_status.and_then(|s| u16::try_from(s).ok()),
            last_error: r.last_error,
        }))
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
    /// Makes the callback of a new job that names one.
    pub(super) async fn insert_notification(
        conn: &mut Conn<D>,
        job_id: i64,
        spec: &JobSpec,
    ) -> Result<()> {
        let Some(notify) = &spec.notify else {
            return Ok(());
        };
        sqlx::query("INSERT INTO notifications (job_id, url, state) VALUES ($1, $2, $3)")
            .bind(job_id)
            .bind(notify.url.as_str())
            .bind(NotifyState::Pending.as_str())
            .execute(D::ex(conn))
            .await?;
        Ok(())
    }

    /// A retried job's callback goes again when the job ends again.
    pub(super) async fn reset_notification(conn: &mut Conn<D>, job_id: i64) -> Result<()> {
        sqlx::query(
            "UPDATE notifications SET state = $2, attempts = 0, next_at_ms = 0 WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(NotifyState::Pending.as_str())
        .execute(D::ex(conn))
        .await?;
        Ok(())
    }
}
