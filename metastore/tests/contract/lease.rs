//! The lease protocol: claim, heartbeat, checkpoint, complete, fail, release.

use std::collections::HashSet;
use std::time::Duration;

use nightshift_metastore::{ClaimRequest, DynMetastore, HeartbeatLot, LeaseTiming, StoreError};
use nightshift_proto::wire::LeaseRef;
use nightshift_proto::{FailureClass, JobState, LeaseState, ShardState};

use crate::{ROWS, assert_err, create, finish, lease_ref, long, part, plan, timing};

fn stale(l: LeaseRef) -> LeaseRef {
    LeaseRef {
        token: l.token + 1,
        ..l
    }
}

pub async fn claim_grants_each_shard_once(store: DynMetastore) {
    let id = create(&store, "claims", "", 5).await;
    let job = store.job(id).await.unwrap().unwrap();
    let shards = store.shards(id).await.unwrap();
    assert!(store.claim("w1", 0, long()).await.unwrap().is_empty());

    let first = store.claim("w1", 2, long()).await.unwrap();
    assert_eq!(
        first.iter().map(|l| l.shard_id).collect::<Vec<_>>(),
        vec![shards[0].id, shards[1].id]
    );
    let files = plan(5).files;
    for (i, l) in first.iter().enumerate() {
        assert_eq!(l.job_id, id);
        assert_eq!(l.job_uid, job.uid);
        assert_eq!((l.token, l.attempt, l.checkpoint_rows), (1, 1, 0));
        assert_eq!(l.spec, job.spec);
        assert_eq!(l.plan, plan(5).shards[i]);
        assert_eq!(l.file, files[l.plan.file_index as usize]);
    }
    let rest = store.claim("w2", 10, long()).await.unwrap();
    assert_eq!(rest.len(), 3);
    assert!(store.claim("w3", 10, long()).await.unwrap().is_empty());
    let granted: HashSet<i64> = first.iter().chain(&rest).map(|l| l.shard_id).collect();
    assert_eq!(granted.len(), 5);
    for s in store.shards(id).await.unwrap() {
        assert_eq!(s.state, ShardState::Leased);
        assert_eq!((s.token, s.attempts), (1, 1));
    }
}

pub async fn claim_follows_priority_and_skips_stopped_jobs(store: DynMetastore) {
    let low = create(&store, "low", "", 2).await;
    let high = create(&store, "high", "priority = 5", 2).await;
    let gone = create(&store, "gone", "priority = 9", 2).await;
    store.cancel_job(gone).await.unwrap();
    let leases = store.claim("w1", 3, long()).await.unwrap();
    let jobs: Vec<i64> = leases.iter().map(|l| l.job_id).collect();
    assert_eq!(jobs.iter().filter(|j| **j == high).count(), 2, "{jobs:?}");
    assert_eq!(jobs.iter().filter(|j| **j == low).count(), 1, "{jobs:?}");
    let low_first = store.shards(low).await.unwrap()[0].id;
    assert!(leases.iter().any(|l| l.shard_id == low_first));
    let last = store.claim("w1", 3, long()).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].job_id, low);
}

pub async fn concurrent_claimers_never_share_a_shard(store: DynMetastore) {
    const SHARDS: usize = 200;
    let id = create(&store, "contended", "", SHARDS).await;
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let leases = store.claim(&format!("w{w}"), 3, long()).await.unwrap();
                    if leases.is_empty() {
                        return got;
                    }
                    got.extend(leases.iter().map(|l| (l.shard_id, l.token)));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), SHARDS, "every shard granted once");
    let unique: HashSet<i64> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(unique.len(), SHARDS, "no shard granted twice");
    assert!(all.iter().all(|(_, token)| *token == 1));
    let (counts, _, _) = store.shard_counts(id).await.unwrap();
    assert_eq!(counts.leased, SHARDS as u64);
}

fn request(worker: &str, max: u32) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        max,
    }
}

pub async fn claim_many_serves_requests_in_order(store: DynMetastore) {
    let low = create(&store, "low", "", 3).await;
    let high = create(&store, "high", "priority = 5", 2).await;
    let requests = [request("w1", 1), request("w2", 3), request("w1", 2)];
    let answers = store.claim_many(&requests, long()).await.unwrap();
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    let counts: Vec<usize> = answers.iter().map(Vec::len).collect();
    assert_eq!(
        counts,
        [1, 3, 1],
        "five shards, handed out in request order"
    );
    let jobs: Vec<Vec<i64>> = answers
        .iter()
        .map(|a| {
            let mut jobs: Vec<i64> = a.iter().map(|l| l.job_id).collect();
            jobs.sort();
            jobs
        })
        .collect();
    let mut second = vec![high, low, low];
    second.sort();
    assert_eq!(jobs, [vec![high], second, vec![low]], "priority first");
    let ids: HashSet<i64> = answers.iter().flatten().map(|l| l.shard_id).collect();
    assert_eq!(ids.len(), 5, "no shard granted twice");
    for leases in &answers {
        let refs: Vec<LeaseRef> = leases.iter().map(lease_ref).collect();
        let beat = store.heartbeat("w1", &refs, long()).await.unwrap();
        assert!(
            beat.leases.iter().all(|l| l.state == LeaseState::Held),
            "{beat:?}"
        );
    }
    let seen = store.metrics(60_000).await.unwrap().workers_seen;
    assert_eq!(seen, 2, "both workers are noted as seen");
    let rest = store.claim_many(&[request("w3", 4)], long()).await.unwrap();
    assert!(
        rest[0].as_ref().unwrap().is_empty(),
        "nothing left to grant"
    );
    assert!(store.claim_many(&[], long()).await.unwrap().is_empty());
}

pub async fn concurrent_claim_many_calls_never_share_a_shard(store: DynMetastore) {
    const SHARDS: usize = 300;
    create(&store, "contended-many", "", SHARDS).await;
    let tasks: Vec<_> = (0..6)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let requests: Vec<_> = (0..4).map(|w| request(&format!("t{t}w{w}"), 3)).collect();
                let mut got = Vec::new();
                loop {
                    let answers = store.claim_many(&requests, long()).await.unwrap();
                    let leases: Vec<_> = answers.into_iter().flat_map(Result::unwrap).collect();
                    if leases.is_empty() {
                        return got;
                    }
                    got.extend(leases.iter().map(|l| l.shard_id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), SHARDS, "every shard granted once");
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(unique.len(), SHARDS, "no shard granted twice");
}

pub async fn heartbeat_extends_and_reports(store: DynMetastore) {
    let id = create(&store, "beats", "", 3).await;
    let leases = store.claim("w1", 2, timing(400)).await.unwrap();
    let (a, b) = (lease_ref(&leases[0]), lease_ref(&leases[1]));
    let unknown = LeaseRef {
        shard_id: a.shard_id + 10_000,
        token: 1,
        ..a
    };
    assert!(
        store
            .heartbeat("w1", &[], long())
            .await
            .unwrap()
            .leases
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = store
        .heartbeat("w1", &[b, stale(a), a, unknown], timing(2_000))
        .await
        .unwrap();
    let got: Vec<(i64, i64, LeaseState)> = answer
        .leases
        .iter()
        .map(|s| (s.shard_id, s.token, s.state))
        .collect();
    assert_eq!(
        got,
        vec![
            (b.shard_id, b.token, LeaseState::Held),
            (a.shard_id, a.token + 1, LeaseState::Lost),
            (a.shard_id, a.token, LeaseState::Held),
            (unknown.shard_id, 1, LeaseState::Lost),
        ]
    );
    // Past the first ttl, the extended leases are not expired.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.reap_expired(timing(400)).await.unwrap(), 0);
    // A completed shard's lease is lost.
    finish(&store, &leases[1]).await;
    let answer = store.heartbeat("w1", &[a, b], long()).await.unwrap();
    assert_eq!(answer.leases[0].state, LeaseState::Held);
    assert_eq!(answer.leases[1].state, LeaseState::Lost);
    // A cancelled job's leases are cancelled.
    store.cancel_job(id).await.unwrap();
    let answer = store.heartbeat("w1", &[a, b], long()).await.unwrap();
    assert_eq!(answer.leases[0].state, LeaseState::Cancelled);
    assert_eq!(answer.leases[1].state, LeaseState::Lost);
}

pub async fn heartbeat_many_answers_each_worker_as_alone(store: DynMetastore) {
    create(&store, "many-beats", "", 4).await;
    let mine = store.claim("w1", 2, timing(400)).await.unwrap();
    let theirs = store.claim("w2", 1, timing(400)).await.unwrap();
    let (a, b, c) = (
        lease_ref(&mine[0]),
        lease_ref(&mine[1]),
        lease_ref(&theirs[0]),
    );
    let lot = |worker: &str, leases: &[LeaseRef]| HeartbeatLot {
        worker: worker.into(),
        leases: leases.to_vec(),
    };
    finish(&store, &mine[1]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answers = store
        .heartbeat_many(
            &[
                lot("w1", &[a, b]),
                lot("w3", &[]),
                lot("w2", &[c, stale(c)]),
            ],
            timing(2_000),
        )
        .await
        .unwrap();
    let states: Vec<Vec<(i64, LeaseState)>> = answers
        .iter()
        .map(|a| a.iter().map(|s| (s.shard_id, s.state)).collect())
        .collect();
    assert_eq!(
        states,
        vec![
            vec![
                (a.shard_id, LeaseState::Held),
                (b.shard_id, LeaseState::Lost)
            ],
            vec![],
            vec![
                (c.shard_id, LeaseState::Held),
                (c.shard_id, LeaseState::Lost)
            ],
        ]
    );
    // Both workers' held leases were extended past their first ttl.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.reap_expired(timing(400)).await.unwrap(), 0);
    assert!(
        store.heartbeat_many(&[], long()).await.unwrap().is_empty(),
        "no request, no answer"
    );
}

pub async fn checkpoint_many_answers_each_part_as_alone(store: DynMetastore) {
    let id = create(&store, "many-parts", "", 3).await;
    let leases = store.claim("w1", 3, long()).await.unwrap();
    let (a, b, c) = (
        lease_ref(&leases[0]),
        lease_ref(&leases[1]),
        lease_ref(&leases[2]),
    );
    let answers = store
        .checkpoint_many(&[
            (a, part(a, 0, 4)),
            (b, part(b, 2, 4)),
            (stale(c), part(stale(c), 0, 4)),
            (c, part(c, 0, ROWS)),
        ])
        .await
        .unwrap();
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(
        matches!(
            answers[1],
            Err(StoreError::CheckpointGap {
                expected: 0,
                got: 2,
                ..
            })
        ),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(answers[2], Err(StoreError::LeaseLost { .. })),
        "{:?}",
        answers[2]
    );
    assert!(answers[3].is_ok(), "{:?}", answers[3]);
    // Two parts of one lease in one call are taken in order, the second after the first.
    let twice = store
        .checkpoint_many(&[(a, part(a, 4, 2)), (b, part(b, 0, 1)), (a, part(a, 6, 2))])
        .await
        .unwrap();
    assert!(twice.iter().all(Result::is_ok), "{twice:?}");
    // What was accepted is recorded, what was refused is not.
    let (_, done, _) = store.shard_counts(id).await.unwrap();
    assert_eq!(done, 8 + 1 + ROWS);
    store.complete(c).await.unwrap();
    assert!(store.checkpoint_many(&[]).await.unwrap().is_empty());
}

pub async fn checkpoint_is_contiguous_and_fenced(store: DynMetastore) {
    let id = create(&store, "checkpoints", "[errors]\nmax_rows = 100", 2).await;
    let leases = store.claim("w1", 2, long()).await.unwrap();
    let l = lease_ref(&leases[0]);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    assert_err!(
        store.checkpoint(l, &part(l, 0, 4)).await,
        StoreError::CheckpointGap {
            expected: 4,
            got: 0,
            ..
        }
    );
    assert_err!(
        store.checkpoint(l, &part(l, 6, 2)).await,
        StoreError::CheckpointGap {
            expected: 4,
            got: 6,
            ..
        }
    );
    // Past the shard's end, or empty.
    assert_err!(
        store.checkpoint(l, &part(l, 4, ROWS)).await,
        StoreError::CheckpointGap { expected: 4, .. }
    );
    assert_err!(
        store.checkpoint(l, &part(l, 4, 0)).await,
        StoreError::CheckpointGap { .. }
    );
    assert_err!(
        store.checkpoint(l, &part(l, 4, u64::MAX)).await,
        StoreError::CheckpointGap { .. }
    );
    assert_err!(
        store.checkpoint(l, &part(l, u64::MAX, 1)).await,
        StoreError::CheckpointGap { .. }
    );
    assert_err!(
        store.checkpoint(stale(l), &part(stale(l), 4, 2)).await,
        StoreError::LeaseLost { .. }
    );
    let mut last = part(l, 4, ROWS - 4);
    last.error_rows = 1;
    last.error_uri = Some("s3://out/_errors/x.parquet".into());
    last.error_bytes = 77;
    store.checkpoint(l, &last).await.unwrap();

    let parts = store.parts(id).await.unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!((parts[0].row_start, parts[0].rows), (0, 4));
    assert_eq!(parts[0].uri, part(l, 0, 4).uri);
    assert_eq!(parts[0].bytes, 400);
    assert_eq!(parts[0].token, l.token);
    assert_eq!(parts[0].shard_id, l.shard_id);
    assert_eq!((parts[1].row_start, parts[1].rows), (4, ROWS - 4));
    assert_eq!(parts[1].error_rows, 1);
    assert_eq!(
        parts[1].error_uri.as_deref(),
        Some("s3://out/_errors/x.parquet")
    );
    assert_eq!(parts[1].error_bytes, 77);
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!((shard.checkpoint_rows, shard.error_rows), (ROWS, 1));
    let (_, done, errors) = store.shard_counts(id).await.unwrap();
    assert_eq!((done, errors), (ROWS, 1));

    // A stopped job takes no more checkpoints.
    store.cancel_job(id).await.unwrap();
    let other = lease_ref(&leases[1]);
    assert_err!(
        store.checkpoint(other, &part(other, 0, 2)).await,
        StoreError::JobNotRunning {
            state: JobState::Cancelled,
            ..
        }
    );
    assert_eq!(store.parts(id).await.unwrap().len(), 2);
}

pub async fn complete_needs_every_row(store: DynMetastore) {
    let id = create(&store, "completes", "", 2).await;
    let leases = store.claim("w1", 2, long()).await.unwrap();
    let l = lease_ref(&leases[0]);
    assert_err!(
        store.complete(l).await,
        StoreError::Incomplete {
            done: 0,
            rows: ROWS,
            ..
        }
    );
    store.checkpoint(l, &part(l, 0, 6)).await.unwrap();
    assert_err!(
        store.complete(l).await,
        StoreError::Incomplete {
            done: 6,
            rows: ROWS,
            ..
        }
    );
    store.checkpoint(l, &part(l, 6, ROWS - 6)).await.unwrap();
    assert_err!(store.complete(stale(l)).await, StoreError::LeaseLost { .. });
    store.complete(l).await.unwrap();
    assert_err!(store.complete(l).await, StoreError::LeaseLost { .. });
    assert_err!(
        store.checkpoint(l, &part(l, ROWS, 1)).await,
        StoreError::LeaseLost { .. }
    );
    let shards = store.shards(id).await.unwrap();
    assert_eq!(shards[0].state, ShardState::Done);
    // Completing a shard of a job cancelled meanwhile is not the worker's error.
    store.cancel_job(id).await.unwrap();
    store.complete(lease_ref(&leases[1])).await.unwrap();
}

pub async fn complete_many_answers_each_lease(store: DynMetastore) {
    let id = create(&store, "batch-completes", "", 4).await;
    assert!(store.complete_many(&[]).await.unwrap().is_empty());
    let leases = store.claim("w1", 4, long()).await.unwrap();
    let [a, b, c, d] = [0, 1, 2, 3].map(|i| lease_ref(&leases[i]));
    for l in [a, b, d] {
        store.checkpoint(l, &part(l, 0, ROWS)).await.unwrap();
    }
    store.checkpoint(c, &part(c, 0, 4)).await.unwrap();
    let answers = store.complete_many(&[b, stale(d), c, a, b]).await.unwrap();
    let [first, lost, short, other, twice] = <[_; 5]>::try_from(answers).unwrap();
    first.unwrap();
    assert_err!(lost, StoreError::LeaseLost { .. });
    assert_err!(
        short,
        StoreError::Incomplete {
            done: 4,
            rows: ROWS,
            ..
        }
    );
    other.unwrap();
    // Named twice in one call: the second answer is what a second `complete` would say.
    assert_err!(twice, StoreError::LeaseLost { .. });
    let states: Vec<ShardState> = store
        .shards(id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(
        states,
        [
            ShardState::Done,
            ShardState::Done,
            ShardState::Leased,
            ShardState::Leased
        ]
    );
    // Once done, a lease is gone, in a batch as alone.
    let [done, open] = <[_; 2]>::try_from(store.complete_many(&[a, d]).await.unwrap()).unwrap();
    assert_err!(done, StoreError::LeaseLost { .. });
    open.unwrap();
    // Completing shards of a job cancelled meanwhile is not the worker's error.
    store.cancel_job(id).await.unwrap();
    let [cancelled] = <[_; 1]>::try_from(store.complete_many(&[c]).await.unwrap()).unwrap();
    cancelled.unwrap();
}

pub async fn retryable_failure_backs_off_then_dies(store: DynMetastore) {
    let id = create(&store, "flaky", "[retry]\nmax_attempts = 2", 1).await;
    let backoff = LeaseTiming {
        ttl_ms: 60_000,
        backoff_base_ms: 1_000,
        backoff_max_ms: 1_000,
    };
    let first = store.claim("w1", 1, backoff).await.unwrap().remove(0);
    let l = lease_ref(&first);
    assert_err!(
        store
            .fail(stale(l), FailureClass::Retryable, "x", backoff)
            .await,
        StoreError::LeaseLost { .. }
    );
    store
        .fail(l, FailureClass::Retryable, "throttled", backoff)
        .await
        .unwrap();
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Pending);
    assert_eq!(shard.attempts, 1);
    assert_eq!(shard.error.as_deref(), Some("throttled"));
    assert_err!(
        store
            .fail(l, FailureClass::Retryable, "again", backoff)
            .await,
        StoreError::LeaseLost { .. }
    );
    // Not claimable before the backoff has passed.
    assert!(store.claim("w1", 1, backoff).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let second = store.claim("w2", 1, backoff).await.unwrap().remove(0);
    assert_eq!((second.attempt, second.token), (2, 2));
    store
        .fail(
            lease_ref(&second),
            FailureClass::Retryable,
            "throttled again",
            backoff,
        )
        .await
        .unwrap();
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Dead, "dead after max_attempts");
    assert_eq!(shard.error.as_deref(), Some("throttled again"));
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(store.claim("w1", 1, backoff).await.unwrap().is_empty());
}

pub async fn permanent_failure_is_dead_at_once(store: DynMetastore) {
    let id = create(&store, "broken", "", 2).await;
    let lease = store.claim("w1", 1, long()).await.unwrap().remove(0);
    let l = lease_ref(&lease);
    store
        .fail(l, FailureClass::Permanent, "corrupt footer", long())
        .await
        .unwrap();
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Dead);
    assert_eq!(shard.attempts, 1);
    assert_eq!(shard.error.as_deref(), Some("corrupt footer"));
    assert_err!(
        store
            .fail(l, FailureClass::Permanent, "again", long())
            .await,
        StoreError::LeaseLost { .. }
    );
    // The other shard is still claimable; the dead one is not.
    let next = store.claim("w1", 5, long()).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].shard_id, l.shard_id);
}

pub async fn release_keeps_progress_and_attempts(store: DynMetastore) {
    let id = create(&store, "drained", "[retry]\nmax_attempts = 1", 1).await;
    let backoff = LeaseTiming {
        ttl_ms: 60_000,
        backoff_base_ms: 60_000,
        backoff_max_ms: 60_000,
    };
    let first = store.claim("w1", 1, backoff).await.unwrap().remove(0);
    let l = lease_ref(&first);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    assert_err!(store.release(stale(l)).await, StoreError::LeaseLost { .. });
    store.release(l).await.unwrap();
    assert_err!(store.release(l).await, StoreError::LeaseLost { .. });
    let shard = &store.shards(id).await.unwrap()[0];
    assert_eq!(shard.state, ShardState::Pending);
    assert_eq!(shard.attempts, 0, "a release is not an attempt");
    assert_eq!(shard.checkpoint_rows, 4);
    // Claimable at once, resuming after the checkpoint, under a new token.
    let second = store.claim("w2", 1, backoff).await.unwrap().remove(0);
    assert_eq!(
        (second.attempt, second.token, second.checkpoint_rows),
        (1, 2, 4)
    );
    assert_err!(
        store.checkpoint(l, &part(l, 4, 2)).await,
        StoreError::LeaseLost { .. }
    );
    // The released grant did not count: this is the first attempt, and the last.
    store
        .fail(lease_ref(&second), FailureClass::Retryable, "boom", backoff)
        .await
        .unwrap();
    assert_eq!(store.shards(id).await.unwrap()[0].state, ShardState::Dead);
}

pub async fn lease_holders_name_the_grant(store: DynMetastore) {
    let id = create(&store, "held", "", 2).await;
    let leases = store.claim("w1", 2, long()).await.unwrap();
    let ids: Vec<i64> = leases.iter().map(|l| l.shard_id).collect();
    let holders = store.lease_holders(&ids).await.unwrap();
    assert_eq!(holders.len(), 2);
    for l in &leases {
        let h = holders.iter().find(|h| h.shard_id == l.shard_id).unwrap();
        assert_eq!((h.token, h.worker.as_str()), (l.token, "w1"));
        assert_eq!(h.secret, Some(l.secret));
        assert_eq!(h.rows, ROWS);
        assert_eq!(h.job_uid, l.job_uid);
        assert_eq!(h.output_uri, l.spec.output.uri);
    }
    // A released shard has no holder; granted again, it has a new secret.
    store.release(lease_ref(&leases[0])).await.unwrap();
    assert!(
        store
            .lease_holders(&[leases[0].shard_id])
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.claim("w2", 1, long()).await.unwrap().remove(0);
    assert_eq!(again.shard_id, leases[0].shard_id);
    assert_ne!(again.secret, leases[0].secret);
    let h = store
        .lease_holders(&[again.shard_id])
        .await
        .unwrap()
        .remove(0);
    assert_eq!((h.worker.as_str(), h.secret), ("w2", Some(again.secret)));
    assert_eq!(again.job_id, id);
}

pub async fn a_job_behind_a_large_one_of_equal_priority_is_served_at_the_next_claim(
    store: DynMetastore,
) {
    let large = create(&store, "large", "", 40).await;
    let first = store.claim("w1", 4, long()).await.unwrap();
    assert!(first.iter().all(|l| l.job_id == large));
    let small = create(&store, "small", "", 3).await;
    // The small job holds no lease, the large one four: the small one goes first.
    let next = store.claim("w2", 4, long()).await.unwrap();
    let jobs: Vec<i64> = next.iter().map(|l| l.job_id).collect();
    assert_eq!(jobs.iter().filter(|&&j| j == small).count(), 3, "{jobs:?}");
    assert_eq!(jobs.len(), 4, "the rest from the large job: {jobs:?}");
    // A higher priority still comes first, however many leases it holds.
    let urgent = create(&store, "urgent", "priority = 9", 2).await;
    store.claim("w3", 1, long()).await.unwrap();
    let after = store.claim("w4", 1, long()).await.unwrap();
    assert_eq!(after[0].job_id, urgent);
}
