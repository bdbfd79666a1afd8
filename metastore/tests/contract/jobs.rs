//! Jobs: submission, idempotency, reads, cancel, retry, delete.

use nightshift_metastore::{DynMetastore, JobFilter, JobOutcome, StoreError, Submitted};
use nightshift_proto::{FailureClass, JobState, ShardState};

use crate::{ROWS, assert_err, create, lease_ref, long, new_job, part, spec};

pub async fn ready_after_migrate(store: DynMetastore) {
    assert!(store.ready().await.unwrap());
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
    assert!(store.ready().await.unwrap());
    let now = store.now_ms().await.unwrap();
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now - local).abs() < 60_000,
        "database clock {now} vs {local}"
    );
}

pub async fn create_and_read_back(store: DynMetastore) {
    let job = new_job(spec("reads", "priority = 3"), 3, None);
    let uid = job.uid.clone();
    let created = match store.create_job(job).await.unwrap() {
        Submitted::Created(j) => j,
        other => panic!("expected Created, got {other:?}"),
    };
    assert_eq!(created.uid, uid);
    assert_eq!(created.name, "reads");
    assert_eq!(created.state, JobState::Running);
    assert_eq!(created.priority, 3);
    assert_eq!(created.rows_total, 3 * ROWS);
    assert_eq!(created.output_uri, "s3://out/reads/");
    assert_eq!(created.spec, spec("reads", "priority = 3"));
    assert_eq!(created.spec_hash, created.spec.hash());
    assert!(created.started_at_ms.is_some());
    assert_eq!(created.finished_at_ms, None);
    assert_eq!(store.job(created.id).await.unwrap(), Some(created.clone()));
    assert_eq!(store.job(created.id + 1000).await.unwrap(), None);

    let files = store.input_files(created.id).await.unwrap();
    assert_eq!(files, crate::plan(3).files);

    let shards = store.shards(created.id).await.unwrap();
    assert_eq!(shards.len(), 3);
    assert!(shards.windows(2).all(|w| w[0].id < w[1].id));
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(s.job_id, created.id);
        assert_eq!(s.file_index, (i % 2) as u32);
        assert_eq!(s.rows, ROWS);
        assert_eq!(s.state, ShardState::Pending);
        assert_eq!((s.token, s.attempts, s.checkpoint_rows), (0, 0, 0));
        assert_eq!(s.error, None);
    }
    let (counts, done, errors) = store.shard_counts(created.id).await.unwrap();
    assert_eq!((counts.pending, counts.total(), done, errors), (3, 3, 0, 0));
    assert!(store.parts(created.id).await.unwrap().is_empty());

    // The newest job of a name; newest first in lists.
    let second = create(&store, "reads", "", 1).await;
    let other = create(&store, "other", "", 1).await;
    assert_eq!(
        store.job_by_name("reads").await.unwrap().unwrap().id,
        second
    );
    assert_eq!(store.job_by_name("nope").await.unwrap(), None);
    let ids: Vec<i64> = store
        .list_jobs(&JobFilter::newest(10))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![other, second, created.id]);
    assert_eq!(
        store.list_jobs(&JobFilter::newest(2)).await.unwrap().len(),
        2
    );
}

pub async fn idempotent_create(store: DynMetastore) {
    let first = store
        .create_job(new_job(spec("nightly", ""), 2, Some("nightly-2024-05-01")))
        .await
        .unwrap();
    let Submitted::Created(job) = first else {
        panic!("expected Created, got {first:?}")
    };
    // Same key, same spec (another uid: a second submission of it) -> the existing job.
    let again = store
        .create_job(new_job(spec("nightly", ""), 2, Some("nightly-2024-05-01")))
        .await
        .unwrap();
    let Submitted::Existing(existing) = again else {
        panic!("expected Existing, got {again:?}")
    };
    assert_eq!(existing, job);
    assert_eq!(
        store.job_by_key("nightly-2024-05-01").await.unwrap(),
        Some(job.clone())
    );
    assert_eq!(store.job_by_key("other-key").await.unwrap(), None);
    // Same key, another spec -> refused, naming the job.
    assert_err!(
        store
            .create_job(new_job(spec("nightly", "priority = 9"), 2, Some("nightly-2024-05-01")))
            .await,
        StoreError::IdempotencyConflict { job_id, .. } if job_id == job.id
    );
    assert_eq!(
        store.list_jobs(&JobFilter::newest(10)).await.unwrap().len(),
        1
    );
    assert_eq!(store.shards(job.id).await.unwrap().len(), 2);
    // Jobs without a key never collide.
    create(&store, "nightly", "", 1).await;
    create(&store, "nightly", "", 1).await;
    assert_eq!(
        store.list_jobs(&JobFilter::newest(10)).await.unwrap().len(),
        3
    );
}

pub async fn racing_idempotent_creates_make_one_job(store: DynMetastore) {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_job(new_job(spec("raced", ""), 50, Some("raced-key")))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    let mut ids = Vec::new();
    for t in tasks {
        let submitted = t.await.unwrap().unwrap();
        created += matches!(submitted, Submitted::Created(_)) as usize;
        ids.push(submitted.job().id);
    }
    assert_eq!(created, 1, "exactly one submission creates the job");
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert_eq!(
        store.list_jobs(&JobFilter::newest(10)).await.unwrap().len(),
        1
    );
    assert_eq!(store.shards(ids[0]).await.unwrap().len(), 50);
}

pub async fn cancel_and_retry(store: DynMetastore) {
    let id = create(&store, "cancel", "", 2).await;
    assert_err!(
        store.retry_job(id, false).await,
        StoreError::BadTransition {
            state: JobState::Running,
            ..
        }
    );
    // A shard dies with half its rows committed; the job is cancelled.
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    let l = lease_ref(&lease);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    store
        .fail(l, FailureClass::Permanent, "corrupt row group", long())
        .await
        .unwrap();
    let cancelled = store.cancel_job(id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(cancelled.finished_at_ms.is_some());
    // Cancelling again answers with the cancelled job.
    assert_eq!(
        store.cancel_job(id).await.unwrap().state,
        JobState::Cancelled
    );
    assert!(store.claim("w1", 5, long()).await.unwrap().is_empty());

    // Retry: running again, the dead shard pending with fresh attempts, its checkpoint kept.
    let retried = store.retry_job(id, false).await.unwrap();
    assert_eq!(retried.state, JobState::Running);
    assert_eq!(retried.finished_at_ms, None);
    assert_eq!(retried.error, None);
    let shard = store
        .shards(id)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == lease.shard_id)
        .unwrap();
    assert_eq!(shard.state, ShardState::Pending);
    assert_eq!(shard.attempts, 0);
    assert_eq!(shard.checkpoint_rows, 4);
    assert_eq!(shard.error, None);
    let again = store.claim("w2", 5, long()).await.unwrap();
    assert_eq!(again.len(), 2);
    let resumed = again.iter().find(|s| s.shard_id == lease.shard_id).unwrap();
    assert_eq!(resumed.checkpoint_rows, 4);
    assert_eq!(resumed.attempt, 1);
    assert!(resumed.token > lease.token);

    // Cancel refuses ended jobs; unknown jobs are not found.
    for s in &again {
        crate::finish(&store, s).await;
    }
    crate::merge_all(&store, id).await;
    store.settle_jobs().await.unwrap();
    store.claim_finalize("f", 60_000).await.unwrap().unwrap();
    store
        .finish_job(id, "f", JobOutcome::Succeeded)
        .await
        .unwrap();
    assert_err!(
        store.cancel_job(id).await,
        StoreError::BadTransition {
            state: JobState::Succeeded,
            ..
        }
    );
    assert_err!(
        store.cancel_job(id + 1000).await,
        StoreError::JobNotFound(_)
    );
    assert_err!(
        store.retry_job(id + 1000, false).await,
        StoreError::JobNotFound(_)
    );
}

pub async fn delete_removes_everything(store: DynMetastore) {
    let id = create(&store, "doomed", "", 3).await;
    let keep = create(&store, "kept", "", 1).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    assert_eq!(lease.job_id, id);
    let l = lease_ref(&lease);
    store.checkpoint(l, &part(l, 0, 5)).await.unwrap();
    store.delete_job(id).await.unwrap();
    assert_eq!(store.job(id).await.unwrap(), None);
    assert!(store.shards(id).await.unwrap().is_empty());
    assert!(store.parts(id).await.unwrap().is_empty());
    assert!(store.input_files(id).await.unwrap().is_empty());
    assert_err!(
        store.checkpoint(l, &part(l, 5, 5)).await,
        StoreError::LeaseLost { .. }
    );
    assert_eq!(store.shards(keep).await.unwrap().len(), 1);
    // Deleting twice is not an error.
    store.delete_job(id).await.unwrap();
}

pub async fn large_job(store: DynMetastore) {
    const SHARDS: usize = 100_000;
    let started = std::time::Instant::now();
    let id = create(&store, "large", "", SHARDS).await;
    let took = started.elapsed();
    let (counts, _, _) = store.shard_counts(id).await.unwrap();
    assert_eq!(counts.pending, SHARDS as u64);
    let leases = store.claim("w1", 10, long()).await.unwrap();
    let shards = store.shards(id).await.unwrap();
    assert_eq!(shards.len(), SHARDS);
    let first: Vec<i64> = shards.iter().take(10).map(|s| s.id).collect();
    assert_eq!(leases.iter().map(|l| l.shard_id).collect::<Vec<_>>(), first);
    let last = shards.last().unwrap();
    assert_eq!(last.file_index, ((SHARDS - 1) % 2) as u32);
    eprintln!("created a job of {SHARDS} shards in {took:?}");
}

/// A job with `output` as its output.
fn job_at(name: &str, output: &str) -> nightshift_metastore::NewJob {
    let mut spec = spec(name, "");
    spec.output.uri = output.to_string();
    new_job(spec, 1, None)
}

pub async fn outputs_are_owned(store: DynMetastore) {
    let owner = store
        .create_job(job_at("owner", "s3://out/owned/"))
        .await
        .unwrap()
        .job()
        .clone();
    // The same place (with or without the slash), inside it, or around it: refused, naming
    // the owner.
    for clash in [
        "s3://out/owned/",
        "s3://out/owned",
        "s3://out/owned/day=1/",
        "s3://out/",
        "s3://out",
    ] {
        assert_err!(
            store.create_job(job_at("clash", clash)).await,
            StoreError::OutputTaken { job_id, ref job, .. } if job_id == owner.id && job == "owner"
        );
    }
    // Siblings that share only a prefix of the name are separate places.
    store
        .create_job(job_at("sibling", "s3://out/owned-2/"))
        .await
        .unwrap();
    store
        .create_job(job_at("other-bucket", "s3://out2/owned/"))
        .await
        .unwrap();
    // A cancelled job gives its output up; retrying it then finds the output taken.
    store.cancel_job(owner.id).await.unwrap();
    let successor = store
        .create_job(job_at("successor", "s3://out/owned/"))
        .await
        .unwrap()
        .job()
        .clone();
    assert_err!(
        store.retry_job(owner.id, false).await,
        StoreError::OutputTaken { job_id, .. } if job_id == successor.id
    );
    // Failed and finished jobs keep theirs.
    let lease = store.claim("w1", 5, long()).await.unwrap();
    let l = lease
        .iter()
        .find(|l| l.job_id == successor.id)
        .expect("the successor's shard");
    store
        .fail(lease_ref(l), FailureClass::Permanent, "bad", long())
        .await
        .unwrap();
    store.settle_jobs().await.unwrap();
    assert_eq!(
        store.job(successor.id).await.unwrap().unwrap().state,
        JobState::Failed
    );
    assert_err!(
        store.create_job(job_at("late", "s3://out/owned/x/")).await,
        StoreError::OutputTaken { job_id, .. } if job_id == successor.id
    );
}

/// A cancelled job whose files went when a later job took its output is never retried, even
/// once that job has ended too: its checkpoints name parts that are gone.
pub async fn a_cancelled_job_whose_files_were_removed_is_not_retried(store: DynMetastore) {
    let first = create(&store, "first", "", 1).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    let l = lease_ref(&lease);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    store.cancel_job(first).await.unwrap();
    let running = create(&store, "running", "", 1).await;
    // Only cancelled jobs are marked, and the answer says which: only their files may go.
    let marked = store.files_removed(&[first, running]).await.unwrap();
    assert_eq!(marked, [first]);
    assert_eq!(store.files_removed(&[first]).await.unwrap(), [first]);
    store.cancel_job(running).await.unwrap();
    assert_err!(
        store.retry_job(first, false).await,
        StoreError::FilesRemoved(id) if id == first
    );
    let job = store.job(first).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.files_removed_at_ms.is_some());
    // The one running then retries as before; once retried, it is not marked.
    let retried = store.retry_job(running, false).await.unwrap();
    assert_eq!(
        (retried.state, retried.files_removed_at_ms),
        (JobState::Running, None)
    );
    assert!(store.files_removed(&[running]).await.unwrap().is_empty());
    let running = store.job(running).await.unwrap().unwrap();
    assert_eq!(running.files_removed_at_ms, None);
}

pub async fn retry_drops_a_stale_finalizer_claim(store: DynMetastore) {
    let id = create(&store, "reclaimed", "", 1).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    crate::finish(&store, &lease).await;
    crate::merge_all(&store, id).await;
    store.settle_jobs().await.unwrap();
    store.claim_finalize("gone", 60_000).await.unwrap().unwrap();
    store
        .finish_job(id, "gone", JobOutcome::Failed("commit failed".into()))
        .await
        .unwrap();
    // The retried job settles again and any finalizer may take it at once: the failed
    // commit's claim does not outlive the retry.
    store.retry_job(id, false).await.unwrap();
    store.settle_jobs().await.unwrap();
    let taken = store.claim_finalize("next", 60_000).await.unwrap();
    assert_eq!(taken.map(|j| j.id), Some(id));
}

pub async fn jobs_are_listed_a_page_at_a_time_and_filtered(store: DynMetastore) {
    let key = |name: &str, fire: i64| Some(nightshift_metastore::schedule_key(name, fire));
    let mut ids = Vec::new();
    for (name, k) in [
        ("nightly", key("nightly", 1_000)),
        ("nightly", key("nightly", 2_000)),
        ("nightly-big", key("nightly-big", 1_000)),
        ("adhoc", None),
        ("nightly", None),
    ] {
        let job = store
            .create_job(new_job(
                spec(&format!("{name}{}", ids.len()), ""),
                1,
                k.as_deref(),
            ))
            .await
            .unwrap();
        ids.push(job.job().id);
    }
    store.cancel_job(ids[3]).await.unwrap();
    let list = |f: JobFilter| {
        let store = store.clone();
        async move {
            let jobs = store.list_jobs(&f).await.unwrap();
            jobs.iter().map(|j| j.id).collect::<Vec<i64>>()
        }
    };
    let all = list(JobFilter::newest(10)).await;
    assert_eq!(all, ids.iter().rev().copied().collect::<Vec<_>>());
    // Pages: newest first, each from where the last ended.
    let first = list(JobFilter::newest(2)).await;
    let next = list(JobFilter {
        before_id: first.last().copied(),
        ..JobFilter::newest(2)
    })
    .await;
    assert_eq!([first, next].concat(), all[..4]);
    let by = |f: JobFilter| list(JobFilter { limit: 10, ..f });
    let schedule = by(JobFilter {
        schedule: Some("nightly".into()),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(
        schedule,
        [ids[1], ids[0]],
        "not nightly-big's, not unkeyed ones"
    );
    let prefix = by(JobFilter {
        name_prefix: Some("nightly-".into()),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(prefix, [ids[2]]);
    // A prefix is text: `_` and `%` match only themselves.
    let pattern = by(JobFilter {
        name_prefix: Some("nightl_".into()),
        ..JobFilter::default()
    })
    .await;
    assert!(pattern.is_empty());
    let cancelled = by(JobFilter {
        state: Some(JobState::Cancelled),
        ..JobFilter::default()
    })
    .await;
    assert_eq!(cancelled, [ids[3]]);
}

pub async fn queued_jobs_start_by_priority_then_submission_up_to_the_limit(store: DynMetastore) {
    let queued = |name: &str, priority: i32| {
        let mut job = new_job(spec(name, &format!("priority = {priority}")), 1, None);
        job.queued = true;
        job
    };
    let mut ids = Vec::new();
    for (name, priority) in [("low", 0), ("high", 5), ("low-later", 0), ("high-later", 5)] {
        let job = store.create_job(queued(name, priority)).await.unwrap();
        let job = job.job();
        assert_eq!((job.state, job.started_at_ms), (JobState::Queued, None));
        ids.push(job.id);
    }
    assert!(
        store.claim("w", 10, long()).await.unwrap().is_empty(),
        "a queued job grants nothing"
    );
    assert_eq!(store.start_queued(2).await.unwrap(), [ids[1], ids[3]]);
    assert!(store.start_queued(2).await.unwrap().is_empty(), "two run");
    let started = store.job(ids[1]).await.unwrap().unwrap();
    assert_eq!(started.state, JobState::Running);
    assert!(started.started_at_ms.is_some());
    // One ends: the oldest of the next priority starts; a queued job may be cancelled.
    store.cancel_job(ids[1]).await.unwrap();
    store.cancel_job(ids[2]).await.unwrap();
    assert_eq!(store.start_queued(2).await.unwrap(), [ids[0]]);
    assert_eq!(store.claim("w", 10, long()).await.unwrap().len(), 2);
    // A job retried past the limit waits queued too, and starts when one ends.
    let retried = store.retry_job(ids[1], true).await.unwrap();
    assert_eq!(retried.state, JobState::Queued);
    assert!(store.start_queued(2).await.unwrap().is_empty(), "two run");
    assert!(store.claim("w", 10, long()).await.unwrap().is_empty());
    store.cancel_job(ids[0]).await.unwrap();
    assert_eq!(store.start_queued(2).await.unwrap(), [ids[1]]);
    assert_eq!(store.claim("w", 10, long()).await.unwrap().len(), 1);
}
