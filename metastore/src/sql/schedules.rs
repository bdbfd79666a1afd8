//! Schedules and their fire times. Which jobs a fire time makes is the coordinator's; the
//! store keeps each schedule's next fire time, moved on only from the value a pass read (so of
//! two replicas handling the same fire, one moves it), and what each fire time made, once.

use async_trait::async_trait;
use sqlx::{ColumnIndex, Encode, Type};

use super::{Dialect, RowOf, SqlStore, Value};
use crate::Schedules;
use crate::records::{FireRecord, ScheduleRecord};
use crate::{NewSchedule, Result, StoreError};

/// The columns `ScheduleRecord` reads.
const SCHEDULE: &str = "id, name, cron, timezone, catch_up, spec, paused, next_fire_at_ms, \
     created_at_ms";

fn select(tail: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("SELECT {SCHEDULE} FROM schedules {tail}"))
}

#[async_trait]
impl<D: Dialect> Schedules for SqlStore<D>
where
    for<'r> &'r str: ColumnIndex<RowOf<D>> + Encode<'r, D::DB> + Type<D::DB>,
    for<'r> Option<&'r str>: Encode<'r, D::DB>,
    for<'r> Option<i64>: Encode<'r, D::DB>,
    usize: ColumnIndex<RowOf<D>>,
    i64: Value<D::DB>,
    String: Value<D::DB>,
    bool: Value<D::DB>,
{
    /// A new schedule; its name must be free.
    async fn create_schedule(&self, s: NewSchedule) -> Result<ScheduleRecord> {
        let sql = D::sql(&format!(
            "INSERT INTO schedules (name, cron, timezone, catch_up, spec, next_fire_at_ms, \
             created_at_ms) SELECT $1, $2, $3, $4, $5, $6, {{now}} WHERE true \
             ON CONFLICT (name) DO NOTHING RETURNING {SCHEDULE}"
        ));
        let made: Option<ScheduleRecord> = sqlx::query_as(sql)
            .bind(s.name.as_str())
            .bind(s.cron.as_str())
            .bind(s.timezone.as_str())
            .bind(s.catch_up.as_str())
            .bind(s.spec.as_str())
            .bind(s.next_fire_at_ms)
            .fetch_optional(D::ex(&mut *self.conn().await?))
            .await?;
        made.ok_or(StoreError::ScheduleExists(s.name))
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRecord>> {
        Ok(sqlx::query_as(select("ORDER BY name"))
            .fetch_all(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn schedule(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        Ok(sqlx::query_as(select("WHERE name = $1"))
            .bind(name)
            .fetch_optional(D::ex(&mut *self.conn().await?))
            .await?)
    }

    /// Pauses a schedule, or resumes it from `next_fire_at_ms`.
    async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
        next_fire_at_ms: Option<i64>,
    ) -> Result<Option<ScheduleRecord>> {
        let sql = format!(
            "UPDATE schedules SET paused = $2, next_fire_at_ms = $3 WHERE name = $1 \
             RETURNING {SCHEDULE}"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .bind(paused)
            .bind(next_fire_at_ms.unwrap_or(NO_FIRE))
            .fetch_optional(D::ex(&mut *self.conn().await?))
            .await?)
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM schedules WHERE name = $1")
            .bind(name)
            .execute(D::ex(&mut *self.conn().await?))
            .await?;
        Ok(D::affected(&deleted) > 0)
    }

    /// Schedules not paused whose next fire time has come, by the database clock.
    async fn due_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        Ok(sqlx::query_as(D::sql(&format!(
            "SELECT {SCHEDULE} FROM schedules WHERE NOT paused AND next_fire_at_ms <= {{now}} \
             ORDER BY next_fire_at_ms"
        )))
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?)
    }

    /// Moves a schedule's next fire time from `from_ms` (as a pass read it) to `to_ms`;
    /// false when another pass moved it first.
    async fn advance_schedule(&self, id: i64, from_ms: i64, to_ms: i64) -> Result<bool> {
        let moved = sqlx::query(
            "UPDATE schedules SET next_fire_at_ms = $3 WHERE id = $1 AND next_fire_at_ms = $2",
        )
        .bind(id)
        .bind(from_ms)
        .bind(to_ms)
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(D::affected(&moved) > 0)
    }

    /// Records what a fire time made, once: the first record of a fire time stands.
    async fn record_fire(
        &self,
        schedule_id: i64,
        fire_at_ms: i64,
        made: std::result::Result<i64, &str>,
    ) -> Result<()> {
        let (job_id, error) = match made {
            Ok(job) => (job, None),
            Err(e) => (NO_JOB, Some(e)),
        };
        sqlx::query(
            "INSERT INTO schedule_fires (schedule_id, fire_at_ms, job_id, error) \
             VALUES ($1, $2, NULLIF($3, $5), $4) ON CONFLICT DO NOTHING",
        )
        .bind(schedule_id)
        .bind(fire_at_ms)
        .bind(job_id)
        .bind(error)
        .bind(NO_JOB)
        .execute(D::ex(&mut *self.conn().await?))
        .await?;
        Ok(())
    }

    /// The latest `limit` fire times of a schedule, newest first.
    async fn fires(&self, schedule_id: i64, limit: u32) -> Result<Vec<FireRecord>> {
        Ok(sqlx::query_as(
            "SELECT fire_at_ms, job_id, error FROM schedule_fires WHERE schedule_id = $1 \
             ORDER BY fire_at_ms DESC LIMIT $2",
        )
        .bind(schedule_id)
        .bind(i64::from(limit))
        .fetch_all(D::ex(&mut *self.conn().await?))
        .await?)
    }
}

/// Stands for "no job" in a bound job id (the column is NULL then).
const NO_JOB: i64 = -1;
/// Stands for "no next fire" (a paused schedule): never due.
const NO_FIRE: i64 = i64::MAX;
