//! The lease rules, here once for both dialects: fencing (which writes a grant may make),
//! the reasons a write is refused, job transitions, backoff and dead-after-N-attempts. The
//! backends run these rules' SQL (`sql/`) or call them on the rows they read.

use nightshift_proto::wire::{LeaseRef, PartRecord};
use nightshift_proto::{JobState, LeaseState, ShardState};

use crate::records::{JobRecord, LeaseRow};
use crate::{LeaseTiming, StoreError};

/// What a shard is: a range of input rows, or merge work over row shards' parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShardKind {
    Rows,
    Merge,
    /// A speculative copy of a straggling row shard (`speculation.rs`).
    Copy,
}

impl ShardKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ShardKind::Rows => "rows",
            ShardKind::Merge => "merge",
            ShardKind::Copy => "copy",
        }
    }
}

/// Jobs in these states may be cancelled (a cancelled one answers as it is).
pub(crate) const CANCELLABLE: [JobState; 5] = [
    JobState::Pending,
    JobState::Planning,
    JobState::Queued,
    JobState::Running,
    JobState::Finalizing,
];

/// A failed or cancelled job may run again.
pub(crate) fn can_retry(state: JobState) -> bool {
    matches!(state, JobState::Failed | JobState::Cancelled)
}

/// Why `job` may not run again, if it may not: it has not ended badly, or its files were
/// removed when a later job took its output (its checkpoints name parts that are gone).
pub(crate) fn retry_refusal(job: &JobRecord) -> Option<StoreError> {
    if !can_retry(job.state) {
        return Some(StoreError::BadTransition {
            job_id: job.id,
            state: job.state,
            action: "retry",
        });
    }
    job.files_removed_at_ms
        .map(|_| StoreError::FilesRemoved(job.id))
}

/// Why a guarded lease write touched nothing, when the lease itself is the reason: it is no
/// longer held under this token (fencing), or its job stopped running. `None` means the lease
/// is fine and the write was refused for its own reason.
pub(crate) fn refusal(row: Option<&LeaseRow>, lease: LeaseRef) -> Option<StoreError> {
    let lost = StoreError::LeaseLost {
        shard_id: lease.shard_id,
        token: lease.token,
    };
    let Some(row) = row else { return Some(lost) };
    if row.state != ShardState::Leased || row.token != lease.token {
        return Some(lost);
    }
    (row.job_state != JobState::Running).then_some(StoreError::JobNotRunning {
        job_id: row.job_id,
        state: row.job_state,
    })
}

/// What a heartbeat says of a lease it did not extend: still granted under this token but its
/// job stopped, or lost.
pub(crate) fn unextended(row: Option<&LeaseRow>, lease: LeaseRef) -> LeaseState {
    match refusal(row, lease) {
        Some(StoreError::JobNotRunning { .. }) => LeaseState::Cancelled,
        // A lease that is fine was extended; not extending it means it was lost meanwhile.
        _ => LeaseState::Lost,
    }
}

/// What a completion the guarded update refused answers: fine when the job stopped (finishing
/// a shard of a cancelled job is not the worker's error), otherwise why it could not complete.
pub(crate) fn completion_refused(
    row: Option<&LeaseRow>,
    lease: LeaseRef,
) -> Result<(), StoreError> {
    match refusal(row, lease) {
        Some(StoreError::JobNotRunning { .. }) => Ok(()),
        Some(e) => Err(e),
        None => Err(StoreError::Incomplete {
            shard_id: lease.shard_id,
            done: row.map_or(0, |r| r.checkpoint_rows),
            rows: row.map_or(0, |r| r.rows),
        }),
    }
}

/// Why a checkpoint the guarded update refused was refused.
pub(crate) fn checkpoint_refused(
    row: Option<&LeaseRow>,
    lease: LeaseRef,
    part: &PartRecord,
) -> StoreError {
    refusal(row, lease).unwrap_or(StoreError::CheckpointGap {
        shard_id: lease.shard_id,
        expected: row.map_or(0, |r| r.checkpoint_rows),
        got: part.row_start,
    })
}

/// The order claims serve running jobs in, over `jobs` rows in state `running` (a bound
/// parameter): higher priority first; among equal priority, the job holding the fewest leased
/// shards (`leased` binds that state), so a job submitted behind a large one is served at the
/// next claim; then the oldest. The count reads every leased shard of the job (a millisecond
/// at 2,000 leases), so it is made only when another running job has the same priority. The
/// state is matched as a range of one value: a plan made for any value (PostgreSQL's generic
/// plan) then still counts through the `(job_id, state)` index instead of scanning the table.
pub(crate) fn serve_order(running: &str, leased: &str) -> String {
    format!(
        "priority DESC, \
         CASE WHEN EXISTS (SELECT 1 FROM jobs o WHERE o.state = {running} \
             AND o.priority = jobs.priority AND o.id <> jobs.id) \
           THEN (SELECT COUNT(*) FROM shards l WHERE l.job_id = jobs.id \
             AND l.state >= {leased} AND l.state <= {leased}) \
         END, id"
    )
}

/// `LeaseTiming::backoff_ms` of the shard `s` as SQL: the delay for each attempt count (it is
/// flat past 20), so that the formula stays in `LeaseTiming`.
pub(crate) fn backoff_sql(timing: LeaseTiming) -> String {
    let mut sql = String::from("CASE");
    for attempts in 1..20 {
        let ms = timing.backoff_ms(attempts);
        sql.push_str(&format!(" WHEN s.attempts <= {attempts} THEN {ms}"));
    }
    sql.push_str(&format!(" ELSE {} END", timing.backoff_ms(20)));
    sql
}

/// The end of a grant that failed or expired, over shard `s` of job `j`: dead when `$1` (a
/// permanent failure) or when it used the job's attempts, else pending after a backoff.
/// Binds `$1` give up, `$2` dead, `$3` pending, `$4` error, `$5` error class.
pub(crate) fn end_grant_sql(timing: LeaseTiming) -> String {
    format!(
        "state = CASE WHEN $1 OR s.attempts >= j.max_attempts THEN $2 ELSE $3 END, \
         not_before_ms = {{now}} + {}, worker_id = NULL, lease_expires_at_ms = NULL, \
         error = $4, error_class = $5",
        backoff_sql(timing)
    )
}

/// The error a job fails with when its poison rows pass the threshold, if they do.
pub(crate) fn error_threshold_exceeded(job: &JobRecord, error_rows: u64) -> Option<String> {
    let allowed = job.spec.errors.allowed_rows(job.rows_total);
    let setting = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
    (error_rows > allowed).then(|| {
        format!(
            "{error_rows} poison rows (see _errors/ in the output) exceed the threshold of {allowed} \
             ([errors] max_rows = {}, max_fraction = {}, {} input rows)",
            setting(job.spec.errors.max_rows.map(|v| v.to_string())),
            setting(job.spec.errors.max_fraction.map(|v| v.to_string())),
            job.rows_total
        )
    })
}

/// The error a job fails with when shards died.
pub(crate) fn dead_shards_message(dead: i64, first: i64, error: Option<&str>) -> String {
    format!(
        "{dead} shard(s) failed for good; shard {first}: {}",
        error.unwrap_or("no error recorded")
    )
}

#[cfg(test)]
mod tests {
    use nightshift_proto::wire::LeaseSecret;

    use super::*;

    const LEASE: LeaseRef = LeaseRef {
        shard_id: 7,
        token: 3,
        secret: LeaseSecret::from_u128(1),
    };

    fn row(state: ShardState, token: i64, job_state: JobState) -> LeaseRow {
        LeaseRow {
            state,
            token,
            checkpoint_rows: 4,
            rows: 10,
            job_id: 1,
            job_state,
        }
    }

    #[test]
    fn a_write_under_an_old_token_or_for_a_shard_no_longer_leased_is_fenced() {
        for r in [
            None,
            Some(row(ShardState::Leased, 4, JobState::Running)),
            Some(row(ShardState::Pending, 3, JobState::Running)),
            Some(row(ShardState::Done, 3, JobState::Running)),
        ] {
            assert!(matches!(
                refusal(r.as_ref(), LEASE),
                Some(StoreError::LeaseLost {
                    shard_id: 7,
                    token: 3
                })
            ));
            assert_eq!(unextended(r.as_ref(), LEASE), LeaseState::Lost);
        }
        let held = row(ShardState::Leased, 3, JobState::Running);
        assert!(refusal(Some(&held), LEASE).is_none());
    }

    #[test]
    fn a_lease_of_a_stopped_job_is_cancelled_and_may_still_complete() {
        let stopped = row(ShardState::Leased, 3, JobState::Cancelled);
        assert!(matches!(
            refusal(Some(&stopped), LEASE),
            Some(StoreError::JobNotRunning {
                job_id: 1,
                state: JobState::Cancelled
            })
        ));
        assert_eq!(unextended(Some(&stopped), LEASE), LeaseState::Cancelled);
        assert!(completion_refused(Some(&stopped), LEASE).is_ok());
    }

    #[test]
    fn a_held_lease_is_refused_for_its_own_reason() {
        let held = row(ShardState::Leased, 3, JobState::Running);
        assert!(matches!(
            completion_refused(Some(&held), LEASE),
            Err(StoreError::Incomplete {
                shard_id: 7,
                done: 4,
                rows: 10
            })
        ));
        let part = PartRecord {
            uri: "p".into(),
            row_start: 6,
            rows: 1,
            bytes: 1,
            error_rows: 0,
            error_uri: None,
            error_bytes: 0,
            tokens: None,
        };
        assert!(matches!(
            checkpoint_refused(Some(&held), LEASE, &part),
            StoreError::CheckpointGap {
                expected: 4,
                got: 6,
                ..
            }
        ));
    }

    #[test]
    fn only_failed_or_cancelled_jobs_retry_and_only_live_ones_cancel() {
        for state in JobState::ALL.iter().copied() {
            assert_eq!(
                can_retry(state),
                matches!(state, JobState::Failed | JobState::Cancelled)
            );
            assert_eq!(CANCELLABLE.contains(&state), !state.is_terminal());
        }
    }

    #[test]
    fn the_backoff_table_follows_the_timing() {
        let timing = LeaseTiming {
            ttl_ms: 1,
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
        };
        let sql = backoff_sql(timing);
        assert!(
            sql.starts_with("CASE WHEN s.attempts <= 1 THEN 100 WHEN s.attempts <= 2 THEN 200")
        );
        assert!(sql.ends_with("ELSE 1000 END"), "{sql}");
        assert!(end_grant_sql(timing).contains(&sql));
    }
}
