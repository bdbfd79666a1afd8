//! A job as the API shows it, from its record and what its shards count.

use nightshift_metastore::JobRecord;
use nightshift_proto::wire::{JobView, PlanningView, ShardCounts};

/// The view of `job`, given its shard counts, rows done and error rows, and the database
/// clock; the parts read elsewhere (models, callback, text, cost) are left empty.
pub(crate) fn job_view(
    job: &JobRecord,
    counts: ShardCounts,
    rows_done: u64,
    error_rows: u64,
    now_ms: i64,
) -> JobView {
    let start = job.started_at_ms.unwrap_or(job.created_at_ms);
    let end = job.finished_at_ms.unwrap_or(now_ms);
    let secs = ((end - start).max(1)) as f64 / 1000.0;
    let rows_per_s = rows_done as f64 / secs;
    let left = job.rows_total.saturating_sub(rows_done);
    let eta_s = (!job.state.is_terminal() && rows_per_s > 0.0).then(|| left as f64 / rows_per_s);
    JobView {
        id: job.id,
        name: job.name.clone(),
        state: job.shown_state(),
        priority: job.priority,
        spec_hash: job.spec_hash.clone(),
        idempotency_key: job.idempotency_key.clone(),
        output_uri: job.output_uri.clone(),
        rows_total: job.rows_total,
        rows_done,
        error_rows,
        shards: counts,
        rows_per_s,
        eta_s,
        error: job.error.clone(),
        created_at_ms: job.created_at_ms,
        finished_at_ms: job.finished_at_ms,
        model_held_by: Vec::new(),
        notify: None,
        text: None,
        cost: None,
        batch_rows: job.batch_rows.and_then(|n| u64::try_from(n).ok()),
        planning: planning_view(job),
    }
}

/// How far background planning has come, while it goes on.
fn planning_view(job: &JobRecord) -> Option<PlanningView> {
    (job.planning && !job.state.is_terminal()).then(|| PlanningView {
        files_planned: job.files_planned,
        files_listed: job.files_listed.and_then(|n| u64::try_from(n).ok()),
    })
}

#[cfg(test)]
mod tests {
    use nightshift_proto::{JobSpec, JobState};

    use super::*;

    fn record(state: JobState, planning: bool) -> JobRecord {
        let spec = JobSpec::from_toml(
            "name = \"j\"\n[input]\nuri = \"s3://in/*.parquet\"\n[model]\nuri = \"s3://m.onnx\"\n\
             [model.inputs]\nx = \"features\"\n[model.outputs]\ny = \"y\"\n[output]\nuri = \"s3://out/\"\n",
        )
        .unwrap();
        JobRecord {
            id: 7,
            uid: "u".into(),
            name: "j".into(),
            idempotency_key: None,
            spec_hash: spec.hash(),
            spec,
            state,
            priority: 0,
            rows_total: 1_000,
            output_uri: "s3://out/".into(),
            error: None,
            created_at_ms: 1_000,
            started_at_ms: Some(2_000),
            finished_at_ms: None,
            batch_rows: Some(64),
            planning,
            output_schema: None,
            files_planned: 2,
            files_listed: Some(4),
            files_removed_at_ms: None,
        }
    }

    #[test]
    fn a_running_job_still_planned_shows_as_planning_with_its_progress() {
        let view = job_view(
            &record(JobState::Running, true),
            ShardCounts::default(),
            0,
            0,
            3_000,
        );
        assert_eq!(view.state, JobState::Planning);
        let planning = view.planning.expect("planning");
        assert_eq!(
            (planning.files_planned, planning.files_listed),
            (2, Some(4))
        );
        assert_eq!(view.batch_rows, Some(64));
    }

    #[test]
    fn rate_and_eta_come_from_the_rows_done_since_the_start() {
        let view = job_view(
            &record(JobState::Running, false),
            ShardCounts::default(),
            500,
            3,
            4_000,
        );
        assert_eq!(view.state, JobState::Running);
        assert!(view.planning.is_none());
        assert_eq!((view.rows_done, view.error_rows), (500, 3));
        assert_eq!(view.rows_per_s, 250.0);
        assert_eq!(view.eta_s, Some(2.0));
        let ended = job_view(
            &record(JobState::Failed, true),
            ShardCounts::default(),
            500,
            0,
            4_000,
        );
        assert!(ended.planning.is_none() && ended.eta_s.is_none());
    }
}
