//! Planning in the background: a job recorded before its plan is complete takes its plan in
//! pieces (`append_plan`), runs its first shards meanwhile, and is neither merged to the end
//! nor settled until the last piece.

use nightshift_metastore::merges::plan_groups_for;
use nightshift_metastore::{DynMetastore, JobFilter, PlanPiece, Submitted};
use nightshift_proto::JobState;
use nightshift_proto::wire::{InputFile, JobPlan, ShardPlan};

use crate::{ROWS, finish, long, new_job, spec};

/// Files `after..after + files` of an input of `listed`, one shard of `ROWS` rows each.
fn piece(after: u64, files: u64, listed: u64) -> PlanPiece {
    let indexes = after..after + files;
    PlanPiece {
        after,
        plan: JobPlan {
            files: indexes
                .clone()
                .map(|i| InputFile {
                    uri: format!("s3://in/p/{i}.parquet"),
                    size: 100 + i,
                    etag: None,
                })
                .collect(),
            shards: indexes
                .map(|i| ShardPlan {
                    file_index: i as u32,
                    row_group_start: 0,
                    row_group_end: 1,
                    file_row_start: 0,
                    rows: ROWS,
                })
                .collect(),
            rows_total: files * ROWS,
        },
        listed: Some(listed),
        last: after + files == listed,
    }
}

/// A job recorded with no plan yet, as `submit` records a job over many files.
async fn planning_job(store: &DynMetastore, name: &str) -> i64 {
    let mut spec = spec(name, "");
    spec.output.uri = format!("s3://out/{name}/");
    let mut job = new_job(spec, 0, None);
    job.plan = JobPlan::default();
    job.planning = true;
    match store.create_job(job).await.unwrap() {
        Submitted::Created(j) => {
            assert!(j.planning);
            assert_eq!((j.files_planned, j.rows_total), (0, 0));
            assert_eq!(j.shown_state(), JobState::Planning);
            j.id
        }
        other => panic!("expected Created, got {other:?}"),
    }
}

pub async fn a_job_planned_in_pieces_runs_before_its_plan_ends(store: DynMetastore) {
    let id = planning_job(&store, "pieces").await;
    let planning: Vec<i64> = store
        .planning_jobs()
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(planning, vec![id]);
    // Listed by the state it shows: planning, not running.
    let listed = |state| {
        let store = store.clone();
        async move {
            let filter = JobFilter {
                state: Some(state),
                ..JobFilter::newest(10)
            };
            let jobs = store.list_jobs(&filter).await.unwrap();
            jobs.iter().map(|j| j.id).collect::<Vec<i64>>()
        }
    };
    assert_eq!(listed(JobState::Planning).await, [id]);
    assert!(listed(JobState::Running).await.is_empty());
    let first = piece(0, 2, 4);
    assert!(store.append_plan(id, &first).await.unwrap());
    // The same piece again (another replica planned it meanwhile) records nothing.
    assert!(!store.append_plan(id, &first).await.unwrap());
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(
        (job.files_planned, job.files_listed, job.rows_total),
        (2, Some(4), 2 * ROWS)
    );
    assert_eq!(job.shown_state(), JobState::Planning);

    // Its first shards run while planning goes on.
    let leases = store.claim("w1", 10, long()).await.unwrap();
    let files: Vec<&str> = leases.iter().map(|l| l.file.uri.as_str()).collect();
    assert_eq!(files, ["s3://in/p/0.parquet", "s3://in/p/1.parquet"]);
    for lease in &leases {
        finish(&store, lease).await;
    }
    // Every shard so far is done, yet neither the last merge nor the commit comes early.
    let candidates = store.merge_candidates(id).await.unwrap();
    assert!(plan_groups_for(&candidates, u64::MAX, false).is_empty());
    store.settle_jobs().await.unwrap();
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Running);

    // The last piece numbers its files on and ends planning.
    assert!(store.append_plan(id, &piece(2, 2, 4)).await.unwrap());
    let job = store.job(id).await.unwrap().unwrap();
    assert!(!job.planning);
    assert_eq!(
        (job.files_planned, job.files_listed, job.rows_total),
        (4, Some(4), 4 * ROWS)
    );
    assert_eq!(job.shown_state(), JobState::Running);
    assert!(store.planning_jobs().await.unwrap().is_empty());
    assert_eq!(listed(JobState::Running).await, [id]);
    assert!(listed(JobState::Planning).await.is_empty());
    let recorded: Vec<String> = store
        .input_files(id)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.uri)
        .collect();
    let expected: Vec<String> = (0..4).map(|i| format!("s3://in/p/{i}.parquet")).collect();
    assert_eq!(recorded, expected);
    let rest = store.claim("w1", 10, long()).await.unwrap();
    let files: Vec<&str> = rest.iter().map(|l| l.file.uri.as_str()).collect();
    assert_eq!(files, ["s3://in/p/2.parquet", "s3://in/p/3.parquet"]);
    for lease in &rest {
        finish(&store, lease).await;
    }
    crate::merge_all(&store, id).await;
    store.settle_jobs().await.unwrap();
    assert_eq!(
        store.job(id).await.unwrap().unwrap().state,
        JobState::Finalizing
    );
}

pub async fn a_planning_failure_fails_the_job_and_a_retry_plans_on(store: DynMetastore) {
    let id = planning_job(&store, "broken").await;
    assert!(store.append_plan(id, &piece(0, 1, 3)).await.unwrap());
    let message = "input `s3://in/p/1.parquet` is not a Parquet file: bad magic";
    store.fail_planning(id, message).await.unwrap();
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_deref(), Some(message));
    assert!(store.planning_jobs().await.unwrap().is_empty());
    assert!(!store.append_plan(id, &piece(1, 2, 3)).await.unwrap());

    // Retried, it is planned on from the file after the last one recorded.
    store.retry_job(id, false).await.unwrap();
    let again = store.planning_jobs().await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|j| (j.id, j.files_planned))
            .collect::<Vec<_>>(),
        vec![(id, 1)]
    );
    assert!(store.append_plan(id, &piece(1, 2, 3)).await.unwrap());
    assert_eq!(store.job(id).await.unwrap().unwrap().rows_total, 3 * ROWS);

    // A cancelled job records no more of its plan.
    let cancelled = planning_job(&store, "cancelled").await;
    store.cancel_job(cancelled).await.unwrap();
    assert!(!store.append_plan(cancelled, &piece(0, 1, 1)).await.unwrap());
    store.fail_planning(cancelled, "too late").await.unwrap();
    let job = store.job(cancelled).await.unwrap().unwrap();
    assert_eq!((job.state, job.error), (JobState::Cancelled, None));
}

pub async fn one_owner_plans_a_job_until_its_claim_expires(store: DynMetastore) {
    let id = planning_job(&store, "claimed").await;
    assert!(store.claim_planning(id, "a", 60_000).await.unwrap());
    assert!(
        !store.claim_planning(id, "b", 60_000).await.unwrap(),
        "a holds it"
    );
    assert!(
        store.claim_planning(id, "a", 60_000).await.unwrap(),
        "renewed"
    );
    // Expired (a renewal that already ran out), another owner takes it and `a` no longer can.
    assert!(store.claim_planning(id, "a", -1).await.unwrap());
    assert!(store.claim_planning(id, "b", 60_000).await.unwrap());
    assert!(!store.claim_planning(id, "a", 60_000).await.unwrap());
    // A local run after a crash takes its dead process's claim at once.
    store.recover_after_crash().await.unwrap();
    assert!(store.claim_planning(id, "c", 60_000).await.unwrap());
    // A job planned to its end, or no longer planning, is claimed by no one.
    assert!(store.append_plan(id, &piece(0, 1, 1)).await.unwrap());
    assert!(!store.claim_planning(id, "c", 60_000).await.unwrap());
    let cancelled = planning_job(&store, "claimed-cancelled").await;
    store.cancel_job(cancelled).await.unwrap();
    assert!(!store.claim_planning(cancelled, "a", 60_000).await.unwrap());
}
