//! The background loops: reaper, settler, finalizer claims, metrics.

use std::time::Duration;

use nightshift_metastore::{DynMetastore, JobOutcome, NewSchedule, NotifyOutcome, StoreError};
use nightshift_proto::wire::{LeaseRef, MergeFiles};
use nightshift_proto::{CatchUp, FailureClass, JobState, LeaseState, NotifyState, ShardState};

use crate::{ROWS, assert_err, create, finish, lease_ref, long, part, timing};

pub async fn expired_lease_is_reaped_and_fenced(store: DynMetastore) {
    let id = create(&store, "expiring", "", 1).await;
    let first = store.claim("w1", 1, timing(500)).await.unwrap().remove(0);
    let old = lease_ref(&first);
    store.checkpoint(old, &part(old, 0, 3)).await.unwrap();
    assert_eq!(store.reap_expired(timing(500)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(store.reap_expired(timing(500)).await.unwrap(), 1);
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Pending);
    assert_eq!(shard.checkpoint_rows, 3);
    assert!(shard.error.as_deref().unwrap_or("").contains("expired"));

    let second = store.claim("w2", 1, long()).await.unwrap().remove(0);
    assert!(second.token > first.token);
    assert_eq!((second.attempt, second.checkpoint_rows), (2, 3));
    // Every write under the old token is refused.
    let beat = store.heartbeat("w1", &[old], long()).await.unwrap();
    assert_eq!(beat.leases[0].state, LeaseState::Lost);
    assert_err!(
        store.checkpoint(old, &part(old, 3, 2)).await,
        StoreError::LeaseLost { .. }
    );
    assert_err!(store.complete(old).await, StoreError::LeaseLost { .. });
    assert_err!(
        store
            .fail(old, FailureClass::Retryable, "late", long())
            .await,
        StoreError::LeaseLost { .. }
    );
    assert_err!(store.release(old).await, StoreError::LeaseLost { .. });
    // The new lease carries on from the checkpoint.
    finish(&store, &second).await;
    let parts = store.parts(id).await.unwrap();
    assert_eq!(
        parts
            .iter()
            .map(|p| (p.row_start, p.token))
            .collect::<Vec<_>>(),
        vec![(0, first.token), (3, second.token)]
    );
    assert_eq!(store.shards(id).await.unwrap()[0].state, ShardState::Done);
    assert_eq!(store.reap_expired(timing(500)).await.unwrap(), 0);
}

pub async fn expiry_past_max_attempts_is_dead(store: DynMetastore) {
    let id = create(&store, "lost-worker", "[retry]\nmax_attempts = 1", 1).await;
    store.claim("w1", 1, timing(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.reap_expired(timing(100)).await.unwrap(), 1);
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Dead);
    assert!(store.claim("w1", 1, long()).await.unwrap().is_empty());
}

pub async fn reaper_takes_every_expired_lease(store: DynMetastore) {
    const SHARDS: usize = 1_500;
    let id = create(&store, "mass-expiry", "", SHARDS).await;
    let leases = store.claim("w1", SHARDS as u32, timing(200)).await.unwrap();
    assert_eq!(leases.len(), SHARDS);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Two reapers at once (two replicas) share the work without doing any twice.
    let (a, b) = tokio::join!(
        store.reap_expired(timing(200)),
        store.reap_expired(timing(200))
    );
    assert_eq!(a.unwrap() + b.unwrap(), SHARDS as u64);
    let (counts, _, _) = store.shard_counts(id).await.unwrap();
    assert_eq!((counts.pending, counts.leased), (SHARDS as u64, 0));
}

pub async fn settle_moves_finished_jobs_on(store: DynMetastore) {
    let done = create(&store, "done", "", 2).await;
    let busy = create(&store, "busy", "", 1).await;
    for lease in store.claim("w1", 2, long()).await.unwrap() {
        assert_eq!(lease.job_id, done);
        finish(&store, &lease).await;
    }
    store.claim("w1", 1, long()).await.unwrap();
    // Every row is done, but no merge covers them yet: the job waits for its merge work.
    assert_eq!(store.settle_jobs().await.unwrap(), 0);
    crate::merge_all(&store, done).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    assert_eq!(
        store.job(done).await.unwrap().unwrap().state,
        JobState::Finalizing
    );
    assert_eq!(
        store.job(busy).await.unwrap().unwrap().state,
        JobState::Running
    );
    assert_eq!(store.settle_jobs().await.unwrap(), 0);

    // Two settlers at once (two replicas) move a job once.
    let raced = create(&store, "raced", "", 1).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    finish(&store, &lease).await;
    crate::merge_all(&store, raced).await;
    let (a, b) = tokio::join!(store.settle_jobs(), store.settle_jobs());
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    assert_eq!(
        store.job(raced).await.unwrap().unwrap().state,
        JobState::Finalizing
    );

    // A job with nothing to do has nothing left to wait for.
    let empty = create(&store, "empty", "", 0).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    assert_eq!(
        store.job(empty).await.unwrap().unwrap().state,
        JobState::Finalizing
    );
}

pub async fn settle_fails_job_with_dead_shard(store: DynMetastore) {
    let id = create(&store, "partly-bad", "", 3).await;
    let leases = store.claim("w1", 3, long()).await.unwrap();
    finish(&store, &leases[0]).await;
    store
        .fail(
            lease_ref(&leases[1]),
            FailureClass::Permanent,
            "bad parquet footer",
            long(),
        )
        .await
        .unwrap();
    // Still an open shard: nothing to settle yet.
    assert_eq!(store.settle_jobs().await.unwrap(), 0);
    finish(&store, &leases[2]).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.finished_at_ms.is_some());
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains(&format!("shard {}", leases[1].shard_id)),
        "{error}"
    );
    assert!(error.contains("bad parquet footer"), "{error}");
}

pub async fn error_threshold_fails_the_job(store: DynMetastore) {
    let id = create(&store, "poisoned", "[errors]\nmax_rows = 2", 2).await;
    let leases = store.claim("w1", 2, long()).await.unwrap();
    let (a, b) = (lease_ref(&leases[0]), lease_ref(&leases[1]));
    let mut p = part(a, 0, 5);
    p.error_rows = 2;
    store.checkpoint(a, &p).await.unwrap();
    assert_eq!(
        store.job(id).await.unwrap().unwrap().state,
        JobState::Running
    );
    let mut p = part(b, 0, 5);
    p.error_rows = 1;
    store.checkpoint(b, &p).await.unwrap();
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.finished_at_ms.is_some());
    let error = job.error.unwrap_or_default();
    assert!(error.contains("poison rows"), "{error}");
    // Its workers hear of it and their writes are refused.
    let beat = store.heartbeat("w1", &[a, b], long()).await.unwrap();
    assert!(beat.leases.iter().all(|l| l.state == LeaseState::Cancelled));
    assert_err!(
        store.checkpoint(a, &part(a, 5, 5)).await,
        StoreError::JobNotRunning {
            state: JobState::Failed,
            ..
        }
    );
    assert_eq!(store.settle_jobs().await.unwrap(), 0);

    // Retried, it runs to the end and fails again at settling: the poison rows stay committed.
    store.retry_job(id, false).await.unwrap();
    for l in [a, b] {
        store.checkpoint(l, &part(l, 5, ROWS - 5)).await.unwrap();
        store.complete(l).await.unwrap();
    }
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap_or_default().contains("poison rows"));
}

pub async fn finalize_claim_is_exclusive(store: DynMetastore) {
    let first = finished_job(&store, "first").await;
    let (a, b) = tokio::join!(
        store.claim_finalize("a", 60_000),
        store.claim_finalize("b", 60_000)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (winner, loser) = match (&a, &b) {
        (Some(job), None) => (("a", job), "b"),
        (None, Some(job)) => (("b", job), "a"),
        other => panic!("exactly one finalizer must win, got {other:?}"),
    };
    assert_eq!(winner.1.id, first);
    assert_eq!(winner.1.state, JobState::Finalizing);
    assert!(store.claim_finalize("c", 60_000).await.unwrap().is_none());
    assert_err!(
        store.finish_job(first, loser, JobOutcome::Succeeded).await,
        StoreError::BadTransition {
            state: JobState::Finalizing,
            ..
        }
    );

    // A claim that expires can be taken over; the old owner may no longer finish.
    let second = finished_job(&store, "second").await;
    let taken = store.claim_finalize("slow", 500).await.unwrap().unwrap();
    assert_eq!(taken.id, second);
    assert!(
        store
            .claim_finalize("fast", 60_000)
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let retaken = store.claim_finalize("fast", 60_000).await.unwrap().unwrap();
    assert_eq!(retaken.id, second);
    assert_err!(
        store
            .finish_job(second, "slow", JobOutcome::Succeeded)
            .await,
        StoreError::BadTransition { .. }
    );
    store
        .finish_job(
            second,
            "fast",
            JobOutcome::Failed("compaction failed".into()),
        )
        .await
        .unwrap();
    let job = store.job(second).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_deref(), Some("compaction failed"));

    store
        .finish_job(first, winner.0, JobOutcome::Succeeded)
        .await
        .unwrap();
    let job = store.job(first).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert!(job.finished_at_ms.is_some());
    assert_err!(
        store
            .finish_job(first, winner.0, JobOutcome::Succeeded)
            .await,
        StoreError::BadTransition {
            state: JobState::Succeeded,
            ..
        }
    );
    assert_err!(
        store
            .finish_job(first + 1000, "a", JobOutcome::Succeeded)
            .await,
        StoreError::JobNotFound(_)
    );
    assert!(store.claim_finalize("c", 60_000).await.unwrap().is_none());
}

/// The finalizer renews its claim while it works; giving it up (TTL 0) lets another replica
/// take the job at once; someone who does not hold the claim cannot extend it.
pub async fn finalize_claim_is_renewed_and_given_up(store: DynMetastore) {
    let id = finished_job(&store, "renewed").await;
    let job = store.claim_finalize("a", 400).await.unwrap().unwrap();
    assert_eq!(job.id, id);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(store.extend_finalize(id, "a", 400).await.unwrap());
        assert!(
            store.claim_finalize("b", 400).await.unwrap().is_none(),
            "a renewed claim stays taken"
        );
    }
    assert!(
        !store.extend_finalize(id, "b", 400).await.unwrap(),
        "only the owner extends"
    );
    assert!(store.extend_finalize(id, "a", 0).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let taken = store.claim_finalize("b", 60_000).await.unwrap().unwrap();
    assert_eq!(taken.id, id);
    assert!(
        !store.extend_finalize(id, "a", 60_000).await.unwrap(),
        "the old owner lost it"
    );
    store
        .finish_job(id, "b", JobOutcome::Succeeded)
        .await
        .unwrap();
    assert!(
        !store.extend_finalize(id, "b", 60_000).await.unwrap(),
        "a finished job is not finalizing"
    );
}

/// A one-shard job run to the end and settled: finalizing.
async fn finished_job(store: &DynMetastore, name: &str) -> i64 {
    let id = create(store, name, "", 1).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    finish(store, &lease).await;
    crate::merge_all(store, id).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    id
}

pub async fn metrics_count(store: DynMetastore) {
    const WINDOW: i64 = 60_000;
    let m = store.metrics(WINDOW).await.unwrap();
    assert_eq!(m, Default::default());
    let a = create(&store, "metered-a", "", 3).await;
    let b = create(&store, "metered-b", "", 2).await;
    let m = store.metrics(WINDOW).await.unwrap();
    assert_eq!(
        (
            m.pending_shards,
            m.pending_rows,
            m.leased_shards,
            m.running_jobs
        ),
        (5, 5 * ROWS, 0, 2)
    );
    let leases = store.claim("w1", 2, long()).await.unwrap();
    assert!(leases.iter().all(|l| l.job_id == a));
    store.heartbeat("w2", &[], long()).await.unwrap();
    let m = store.metrics(WINDOW).await.unwrap();
    assert_eq!(
        (
            m.pending_shards,
            m.pending_rows,
            m.leased_shards,
            m.workers_seen
        ),
        (3, 3 * ROWS, 2, 2)
    );
    // A released shard is pending again with only its uncommitted rows left.
    let l: LeaseRef = lease_ref(&leases[0]);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    store.release(l).await.unwrap();
    let m = store.metrics(WINDOW).await.unwrap();
    assert_eq!(
        (m.pending_shards, m.pending_rows, m.leased_shards),
        (4, 4 * ROWS - 4, 1)
    );
    // A cancelled job's shards are not waiting for anyone.
    store.cancel_job(b).await.unwrap();
    let m = store.metrics(WINDOW).await.unwrap();
    assert_eq!(
        (m.pending_shards, m.pending_rows, m.running_jobs),
        (2, 2 * ROWS - 4, 1)
    );
}

/// Workers that die, drain or finish at random while a reaper runs: in the end every shard is
/// done and its committed parts cover its rows exactly once.
pub async fn churn_commits_every_row_once(store: DynMetastore) {
    const SHARDS: usize = 40;
    let id = create(&store, "churn", "[retry]\nmax_attempts = 50", SHARDS).await;
    let ttl = timing(150);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reaper = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.reap_expired(ttl).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let leases = store.claim(&format!("w{w}"), 2, ttl).await.unwrap();
                    if leases.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    for lease in leases {
                        work(&store, &lease).await;
                    }
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (counts, _, _) = store.shard_counts(id).await.unwrap();
        if counts.done == SHARDS as u64 {
            break;
        }
        assert_eq!(counts.dead, 0);
        assert!(
            std::time::Instant::now() < deadline,
            "churn stuck at {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reaper.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let shards = store.shards(id).await.unwrap();
    let parts = store.parts(id).await.unwrap();
    for shard in &shards {
        let mine: Vec<_> = parts.iter().filter(|p| p.shard_id == shard.id).collect();
        let mut next = 0;
        for p in &mine {
            assert_eq!(p.row_start, next, "shard {} parts {mine:?}", shard.id);
            assert!(p.token <= shard.token);
            next += p.rows;
        }
        assert_eq!(next, ROWS, "shard {} parts {mine:?}", shard.id);
    }
    crate::merge_all(&store, id).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
}

/// One worker's go at a lease, chosen by the grant: die silently, drain after one part, or
/// finish. A lease lost on the way is dropped, as a worker would.
async fn work(store: &DynMetastore, lease: &nightshift_proto::wire::ShardLease) {
    let l = lease_ref(lease);
    let fate = (lease.shard_id * 31 + lease.token) % 5;
    let mut at = lease.checkpoint_rows;
    while at < ROWS {
        let rows = 3.min(ROWS - at);
        if store.checkpoint(l, &part(l, at, rows)).await.is_err() {
            return;
        }
        at += rows;
        match fate {
            0 => return,
            1 => {
                let _ = store.release(l).await;
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let _ = store.complete(l).await;
}

pub async fn finalizer_serves_the_oldest_claim_first(store: DynMetastore) {
    let first = finished_job(&store, "stuck").await;
    let second = finished_job(&store, "behind").await;
    // The first job's commit fails and is put off for a while: the next claim takes the other
    // job, however low its id, instead of the same one again.
    let taken = store.claim_finalize("f", 60_000).await.unwrap().unwrap();
    assert_eq!(taken.id, first);
    assert!(store.extend_finalize(first, "f", 60_000).await.unwrap());
    let next = store.claim_finalize("f", 60_000).await.unwrap().unwrap();
    assert_eq!(next.id, second, "a job in backoff is skipped");
    assert!(store.claim_finalize("f", 60_000).await.unwrap().is_none());
    // Both claims lapse: the one claimed longest ago comes first.
    assert!(store.extend_finalize(second, "f", 0).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(store.extend_finalize(first, "f", 0).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = store.claim_finalize("g", 60_000).await.unwrap().unwrap();
    assert_eq!(again.id, second);
}

pub async fn cancel_stops_a_commit(store: DynMetastore) {
    let id = finished_job(&store, "halted").await;
    store.claim_finalize("f", 60_000).await.unwrap().unwrap();
    let cancelled = store.cancel_job(id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    // The commit cannot renew its claim, so it stops before publishing, and cannot end the job.
    assert!(!store.extend_finalize(id, "f", 60_000).await.unwrap());
    assert_err!(
        store.finish_job(id, "f", JobOutcome::Succeeded).await,
        StoreError::BadTransition {
            state: JobState::Cancelled,
            ..
        }
    );
    assert!(store.claim_finalize("g", 60_000).await.unwrap().is_none());
}

pub async fn merges_cover_the_rows_in_order_and_settling_waits_for_them(store: DynMetastore) {
    let id = create(&store, "merged", "", 4).await;
    let leases = store.claim("w1", 4, long()).await.unwrap();
    // Shards 1, 2 and 4 are done, 3 is not: only the run before it may be merged.
    for i in [0, 1, 3] {
        finish(&store, &leases[i]).await;
    }
    // Candidates stop at the first shard not done: nothing past it can be merged yet.
    let candidates = store.merge_candidates(id).await.unwrap();
    assert_eq!(candidates.len(), 3);
    assert_eq!(candidates.iter().filter(|c| c.done).count(), 2);
    assert!(!candidates[2].done);
    assert!(candidates.iter().filter(|c| c.done).all(|c| c.bytes > 0));
    let per_shard = candidates[0].bytes;
    let groups = nightshift_metastore::merges::plan_groups(&candidates, per_shard * 2);
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (groups[0].first, groups[0].last),
        (leases[0].shard_id, leases[1].shard_id)
    );
    assert_eq!(store.create_merges(id, &groups).await.unwrap(), 1);
    assert_eq!(
        store.create_merges(id, &groups).await.unwrap(),
        0,
        "planned twice, made once"
    );
    // The merge work carries the parts it rewrites, in row order; it does not count as rows.
    let merge = store.claim("m", 5, long()).await.unwrap().remove(0);
    let sources = merge.merge.clone().expect("merge work");
    assert_eq!(sources.len(), 2);
    assert_eq!(merge.plan.rows, 2 * ROWS);
    let (counts, done, _) = store.shard_counts(id).await.unwrap();
    assert_eq!((counts.total(), done), (4, 3 * ROWS));
    finish(&store, &merge).await;
    assert_eq!(store.merged_parts(id).await.unwrap().len(), 1);
    // The rest: shard 3 finishes, the last group is made, and only then does the job settle.
    finish(&store, &leases[2]).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 0);
    let rest = store.merge_candidates(id).await.unwrap();
    assert_eq!(rest.len(), 2);
    // A call stops at the first group it does not make: none after it is made out of order.
    let later = nightshift_metastore::merges::plan_groups(&rest, u64::MAX);
    let mixed = [groups[0], later[0]];
    assert_eq!(store.create_merges(id, &mixed).await.unwrap(), 0);
    crate::merge_all(&store, id).await;
    assert_eq!(store.settle_jobs().await.unwrap(), 1);
    let merged = store.merged_parts(id).await.unwrap();
    assert_eq!(merged.iter().map(|p| p.rows).sum::<u64>(), 4 * ROWS);
    assert_eq!(
        store.job(id).await.unwrap().unwrap().state,
        JobState::Finalizing
    );
}

pub async fn merge_work_numbers_its_files_in_row_order(store: DynMetastore) {
    let id = create(&store, "numbered", "[errors]\nmax_fraction = 1.0", 3).await;
    let leases = store.claim("w1", 3, long()).await.unwrap();
    // The second shard's rows are all poison rows, the third has one.
    for (i, lease) in leases.iter().enumerate() {
        let l = lease_ref(lease);
        let mut p = part(l, 0, lease.plan.rows);
        if i > 0 {
            p.error_rows = if i == 1 { p.rows } else { 1 };
            p.error_uri = Some(p.uri.replace(".parquet", "-errors.parquet"));
            p.error_bytes = 10;
        }
        store.checkpoint(l, &p).await.unwrap();
        store.complete(l).await.unwrap();
    }
    // A target of one byte: one merge per shard, made in row order.
    let candidates = store.merge_candidates(id).await.unwrap();
    let groups = nightshift_metastore::merges::plan_groups(&candidates, 1);
    assert_eq!(store.create_merges(id, &groups).await.unwrap(), 3);
    let merges = store.claim("m", 10, long()).await.unwrap();
    let files = |output, errors| Some(MergeFiles { output, errors });
    let expected = [
        files(Some(0), None),
        files(None, Some(0)),
        files(Some(1), Some(1)),
    ];
    let given: Vec<_> = merges.iter().map(|m| m.merge_files).collect();
    assert_eq!(given, expected, "no gap, no name for a file without rows");
    // The holder a checkpoint is checked against names the same files.
    let ids: Vec<i64> = merges.iter().map(|m| m.shard_id).collect();
    let mut held = store.lease_holders(&ids).await.unwrap();
    held.sort_by_key(|h| h.shard_id);
    let held: Vec<_> = held.into_iter().map(|h| h.merge_files).collect();
    assert_eq!(held, expected);
    // Row shards name no output file.
    assert!(leases.iter().all(|l| l.merge_files.is_none()));
    // The first output schema noted stays the job's.
    let uid = store.job(id).await.unwrap().unwrap().uid;
    assert_eq!(store.job(id).await.unwrap().unwrap().output_schema, None);
    store.note_output_schema(&uid, "[1]").await.unwrap();
    store.note_output_schema(&uid, "[2]").await.unwrap();
    let noted = store.job(id).await.unwrap().unwrap().output_schema;
    assert_eq!(noted.as_deref(), Some("[1]"));
}

pub async fn recovery_after_a_crash_expires_every_claim_at_once(store: DynMetastore) {
    // A finalizer claim and a lease held for a long time by a run that died.
    let done = finished_job(&store, "committing").await;
    let claimed = store.claim_finalize("dead-run", 3_600_000).await.unwrap();
    assert_eq!(claimed.map(|j| j.id), Some(done));
    let id = create(&store, "running", "", 2).await;
    let held = store.claim("dead-run", 1, timing(3_600_000)).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(store.reap_expired(timing(3_600_000)).await.unwrap(), 0);
    assert!(
        store
            .claim_finalize("next", 60_000)
            .await
            .unwrap()
            .is_none()
    );
    // Recovery frees both now: the reaper returns the shard, the next finalizer takes the job.
    assert_eq!(store.recover_after_crash().await.unwrap(), 1);
    assert_eq!(store.reap_expired(timing(3_600_000)).await.unwrap(), 1);
    let shards = store.shards(id).await.unwrap();
    assert!(
        shards.iter().all(|s| s.state == ShardState::Pending),
        "{shards:?}"
    );
    let retaken = store.claim_finalize("next", 60_000).await.unwrap();
    assert_eq!(retaken.map(|j| j.id), Some(done));
    assert_eq!(store.recover_after_crash().await.unwrap(), 0);
}

pub async fn callbacks_go_once_a_job_ends_and_again_after_a_retry(store: DynMetastore) {
    let hook = "[notify]\nurl = \"https://hooks.example.com/n\"";
    let id = create(&store, "called", hook, 1).await;
    let _silent = create(&store, "silent", "", 1).await;
    let fail = |retry_in_ms| NotifyOutcome::Failed {
        status: Some(500),
        error: None,
        retry_in_ms,
    };
    // Nothing goes while the job runs.
    assert!(
        store
            .claim_notifications(10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    let view = store
        .notification(id)
        .await
        .unwrap()
        .expect("made with the job");
    assert_eq!((view.state, view.attempts), (NotifyState::Pending, 0));
    store.cancel_job(id).await.unwrap();
    let due = store.claim_notifications(10, 60_000).await.unwrap();
    assert_eq!(
        due.len(),
        1,
        "one callback, of the job that names one: {due:?}"
    );
    assert_eq!((due[0].job_id, due[0].attempt), (id, 1));
    assert_eq!(due[0].url, "https://hooks.example.com/n");
    // A try holds it: no second taker until it is settled.
    assert!(
        store
            .claim_notifications(10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .record_notification(id, 1, &fail(Some(0)))
            .await
            .unwrap()
    );
    let again = store.claim_notifications(10, 60_000).await.unwrap();
    assert_eq!(again[0].attempt, 2);
    let delivered = NotifyOutcome::Delivered { status: 204 };
    assert!(store.record_notification(id, 2, &delivered).await.unwrap());
    let view = store.notification(id).await.unwrap().unwrap();
    assert_eq!(
        (view.state, view.attempts, view.last_status),
        (NotifyState::Delivered, 2, Some(204))
    );
    assert!(store.claim_notifications(10, 0).await.unwrap().is_empty());
    // A retried job calls again when it ends again; an answer to an older try settles nothing.
    store.retry_job(id, false).await.unwrap();
    assert!(
        store
            .claim_notifications(10, 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    store.cancel_job(id).await.unwrap();
    let due = store.claim_notifications(10, 60_000).await.unwrap();
    assert_eq!(due[0].attempt, 1);
    assert!(!store.record_notification(id, 2, &delivered).await.unwrap());
    let no_answer = NotifyOutcome::Failed {
        status: None,
        error: Some("connection refused".into()),
        retry_in_ms: None,
    };
    assert!(store.record_notification(id, 1, &no_answer).await.unwrap());
    let view = store.notification(id).await.unwrap().unwrap();
    assert_eq!(view.state, NotifyState::Abandoned);
    assert_eq!(view.last_error.as_deref(), Some("connection refused"));
    assert_eq!(view.last_status, None);
    assert!(store.claim_notifications(10, 0).await.unwrap().is_empty());
}

pub async fn schedules_fire_once_per_time_and_move_on_from_what_was_read(store: DynMetastore) {
    let now = store.now_ms().await.unwrap();
    let schedule = |name: &str, next: i64| NewSchedule {
        name: name.into(),
        cron: "0 2 * * *".into(),
        timezone: "Europe/Berlin".into(),
        catch_up: CatchUp::All,
        spec: "name = \"x\"".into(),
        next_fire_at_ms: next,
    };
    let due = store
        .create_schedule(schedule("nightly", now - 1_000))
        .await
        .unwrap();
    store
        .create_schedule(schedule("later", now + 3_600_000))
        .await
        .unwrap();
    assert_err!(
        store.create_schedule(schedule("nightly", now)).await,
        StoreError::ScheduleExists(_)
    );
    let names: Vec<String> = store
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["later", "nightly"]);
    let found = store.due_schedules().await.unwrap();
    assert_eq!(
        found,
        std::slice::from_ref(&due),
        "only the schedule whose time has come"
    );
    assert_eq!(found[0].catch_up, CatchUp::All);
    // Two passes handle the same fire time: the first moves it on, the second finds it moved.
    let fire = now - 1_000;
    let job = create(&store, "fired", "", 1).await;
    store.record_fire(due.id, fire, Ok(job)).await.unwrap();
    store
        .record_fire(due.id, fire, Err("late duplicate"))
        .await
        .unwrap();
    assert!(
        store
            .advance_schedule(due.id, fire, now + 60_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .advance_schedule(due.id, fire, now + 120_000)
            .await
            .unwrap()
    );
    assert!(store.due_schedules().await.unwrap().is_empty());
    store
        .record_fire(due.id, now + 60_000, Err("no input for that date"))
        .await
        .unwrap();
    let fires = store.fires(due.id, 10).await.unwrap();
    assert_eq!(fires.len(), 2);
    assert_eq!(
        (fires[0].job_id, fires[0].error.as_deref()),
        (None, Some("no input for that date"))
    );
    assert_eq!(
        (fires[1].job_id, fires[1].error.as_deref()),
        (Some(job), None),
        "the first record stands"
    );
    // Paused: never due; resumed from a given time.
    let paused = store
        .set_schedule_paused("nightly", true, None)
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    assert!(store.due_schedules().await.unwrap().is_empty());
    let resumed = store
        .set_schedule_paused("nightly", false, Some(now - 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (resumed.paused, resumed.next_fire_at_ms),
        (false, Some(now - 1))
    );
    assert_eq!(store.due_schedules().await.unwrap().len(), 1);
    assert!(
        store
            .set_schedule_paused("absent", true, None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.delete_schedule("nightly").await.unwrap());
    assert!(!store.delete_schedule("nightly").await.unwrap());
    assert!(
        store.fires(due.id, 10).await.unwrap().is_empty(),
        "its fire records go with it"
    );
    assert!(store.job(job).await.unwrap().is_some(), "its jobs stay");
}

pub async fn the_dashboard_sees_rows_over_time_and_who_holds_what(store: DynMetastore) {
    const WINDOW: i64 = 60_000;
    let a = create(&store, "watched", "", 3).await;
    assert!(store.workers_seen(WINDOW).await.unwrap().is_empty());
    assert!(store.rows_over_time(a, 1_000).await.unwrap().is_empty());
    let leases = store.claim("w1", 2, long()).await.unwrap();
    let other = store.claim("w2", 1, long()).await.unwrap();
    let (l0, l1) = (lease_ref(&leases[0]), lease_ref(&leases[1]));
    store.checkpoint(l0, &part(l0, 0, 4)).await.unwrap();
    store.checkpoint(l0, &part(l0, 4, 3)).await.unwrap();
    store.checkpoint(l1, &part(l1, 0, 2)).await.unwrap();
    // One bucket as long as the test holds every part; the rows add up to what was committed.
    let buckets = store.rows_over_time(a, 3_600_000).await.unwrap();
    let total: u64 = buckets.iter().map(|b| b.rows).sum();
    assert_eq!(total, 9, "{buckets:?}");
    assert!(
        buckets.iter().all(|b| b.at_ms % 3_600_000 == 0),
        "{buckets:?}"
    );
    let now = store.now_ms().await.unwrap();
    assert!(
        buckets
            .iter()
            .all(|b| b.at_ms <= now && now - b.at_ms < 2 * 3_600_000)
    );
    // Both workers are seen; w1's shards committed 9 rows within the window, w2's none.
    let seen = store.workers_seen(WINDOW).await.unwrap();
    let rows: Vec<(&str, u64)> = seen
        .iter()
        .map(|w| (w.id.as_str(), w.rows_recent))
        .collect();
    assert_eq!(rows, [("w1", 9), ("w2", 0)]);
    let held = store.leased_shards().await.unwrap();
    let held: Vec<(&str, i64, u64)> = held
        .iter()
        .map(|s| (s.worker_id.as_str(), s.shard_id, s.checkpoint_rows))
        .collect();
    let want = [
        ("w1", l0.shard_id, 7),
        ("w1", l1.shard_id, 2),
        ("w2", other[0].shard_id, 0),
    ];
    assert_eq!(held, want);
    // Another job's parts are not this one's.
    let b = create(&store, "other", "", 1).await;
    assert!(store.rows_over_time(b, 1_000).await.unwrap().is_empty());
    // A finished shard is no longer held.
    store.checkpoint(l0, &part(l0, 7, ROWS - 7)).await.unwrap();
    store.complete(l0).await.unwrap();
    let held = store.leased_shards().await.unwrap();
    assert!(held.iter().all(|s| s.shard_id != l0.shard_id), "{held:?}");
    let shards = store.shards(a).await.unwrap();
    let done = shards.iter().find(|s| s.id == l0.shard_id).unwrap();
    assert_eq!(done.state, ShardState::Done);
}

/// A succeeded job's garbage is pending from its end until a pass notes it collected; a job
/// that failed leaves none to collect (its parts are kept for a retry).
pub async fn a_succeeded_jobs_garbage_is_pending_until_collected(store: DynMetastore) {
    let done = finished_job(&store, "done").await;
    let failed = finished_job(&store, "failed").await;
    let pending = |age_ms| {
        let store = store.clone();
        async move {
            let jobs = store.garbage_pending(age_ms, 10).await.unwrap();
            jobs.iter().map(|j| j.id).collect::<Vec<i64>>()
        }
    };
    for (id, outcome) in [
        (done, JobOutcome::Succeeded),
        (failed, JobOutcome::Failed("commit failed".into())),
    ] {
        let claimed = store.claim_finalize("f", 60_000).await.unwrap().unwrap();
        assert_eq!(claimed.id, id);
        store.finish_job(id, "f", outcome).await.unwrap();
    }
    assert_eq!(pending(0).await, [done]);
    assert!(pending(3_600_000).await.is_empty(), "ended just now");
    store.garbage_collected(done).await.unwrap();
    assert!(pending(0).await.is_empty());
}
