//! Speculative copies of stragglers: granted only in a job's tail, never to the straggler's
//! own worker and once per shard; the first of the two to complete wins and the loser's parts
//! past the copy's first row never count.

use std::time::Duration;

use nightshift_metastore::speculation::SpeculationPolicy;
use nightshift_metastore::{CopyOutcome, DynMetastore, StoreError};
use nightshift_proto::wire::{LeaseRef, ShardLease};
use nightshift_proto::{JobState, LeaseState};

use crate::{ROWS, assert_err, create, finish, lease_ref, long, part};

/// A straggler is anything held twice as long as a done shard took.
const POLICY: SpeculationPolicy = SpeculationPolicy {
    max_left: 4,
    slowness: 2.0,
    min_done: 3,
};

/// A job of four shards: the first, held by `slow`, has checkpointed half its rows; the
/// three others are done. Answers the job and the straggler's lease, once it is late.
async fn tail_with_a_straggler(store: &DynMetastore, name: &str) -> (i64, ShardLease) {
    let id = create(store, name, "", 4).await;
    let slow = store.claim("slow", 1, long()).await.unwrap().remove(0);
    let l = lease_ref(&slow);
    store.checkpoint(l, &part(l, 0, ROWS / 2)).await.unwrap();
    for lease in store.claim("fast", 3, long()).await.unwrap() {
        finish(store, &lease).await;
    }
    // Held far longer than the done shards took.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (id, slow)
}

async fn lease_state(store: &DynMetastore, worker: &str, lease: LeaseRef) -> LeaseState {
    store
        .heartbeat(worker, &[lease], long())
        .await
        .unwrap()
        .leases[0]
        .state
}

pub async fn a_copy_that_completes_first_wins_and_fences_the_original(store: DynMetastore) {
    let (id, slow) = tail_with_a_straggler(&store, "copy-wins").await;
    let original = lease_ref(&slow);
    assert!(
        store
            .speculate("slow", 1, &POLICY, long())
            .await
            .unwrap()
            .is_empty(),
        "its own"
    );
    let copy = store
        .speculate("w2", 1, &POLICY, long())
        .await
        .unwrap()
        .remove(0);
    assert_ne!(copy.shard_id, slow.shard_id);
    assert_eq!((copy.checkpoint_rows, copy.plan.rows), (ROWS / 2, ROWS));
    assert_eq!(copy.file.uri, slow.file.uri);
    assert!(
        store
            .speculate("w3", 1, &POLICY, long())
            .await
            .unwrap()
            .is_empty(),
        "copied once"
    );
    assert_eq!(store.shard_counts(id).await.unwrap().0.copies, 1);

    // Both run on; the copy finishes first.
    store
        .checkpoint(original, &part(original, ROWS / 2, 2))
        .await
        .unwrap();
    let c = lease_ref(&copy);
    store
        .checkpoint(c, &part(c, ROWS / 2, ROWS / 2))
        .await
        .unwrap();
    store.complete(c).await.unwrap();
    store.settle_jobs().await.unwrap();
    let job = store.job(id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Running,
        "a job with an undecided copy waits"
    );
    let outcome = store.resolve_copies().await.unwrap();
    assert_eq!(outcome, CopyOutcome { won: 1, dropped: 0 });

    // The original's holder is fenced, and only the copy's rows past its start count.
    assert_eq!(
        lease_state(&store, "slow", original).await,
        LeaseState::Lost
    );
    assert_err!(
        store
            .checkpoint(original, &part(original, ROWS / 2 + 2, 1))
            .await,
        StoreError::LeaseLost { .. }
    );
    assert_err!(store.complete(original).await, StoreError::LeaseLost { .. });
    let parts = store.parts(id).await.unwrap();
    let mine: Vec<(u64, u64, i64)> = parts
        .iter()
        .filter(|p| p.shard_id == slow.shard_id)
        .map(|p| (p.row_start, p.rows, p.token))
        .collect();
    assert_eq!(
        mine,
        [(0, ROWS / 2, original.token), (ROWS / 2, ROWS / 2, c.token)]
    );
    assert_eq!(parts.iter().map(|p| p.rows).sum::<u64>(), 4 * ROWS);
    let counts = store.shard_counts(id).await.unwrap();
    assert_eq!((counts.0.done, counts.0.copies, counts.1), (4, 0, 4 * ROWS));
    crate::merge_all(&store, id).await;
    store.settle_jobs().await.unwrap();
    assert_eq!(
        store.job(id).await.unwrap().unwrap().state,
        JobState::Finalizing
    );
}

pub async fn an_original_that_completes_first_drops_its_copy(store: DynMetastore) {
    let (id, slow) = tail_with_a_straggler(&store, "original-wins").await;
    let original = lease_ref(&slow);
    let copy = store
        .speculate("w2", 1, &POLICY, long())
        .await
        .unwrap()
        .remove(0);
    let c = lease_ref(&copy);
    store.checkpoint(c, &part(c, ROWS / 2, 2)).await.unwrap();
    store
        .checkpoint(original, &part(original, ROWS / 2, ROWS / 2))
        .await
        .unwrap();
    store.complete(original).await.unwrap();
    let outcome = store.resolve_copies().await.unwrap();
    assert_eq!(outcome, CopyOutcome { won: 0, dropped: 1 });
    assert_eq!(lease_state(&store, "w2", c).await, LeaseState::Lost);
    assert_err!(
        store.checkpoint(c, &part(c, ROWS / 2 + 2, 1)).await,
        StoreError::LeaseLost { .. }
    );
    let parts = store.parts(id).await.unwrap();
    assert!(
        parts.iter().all(|p| p.shard_id != copy.shard_id),
        "the copy's parts are gone"
    );
    assert_eq!(parts.iter().map(|p| p.rows).sum::<u64>(), 4 * ROWS);
    assert_eq!(
        store.resolve_copies().await.unwrap(),
        CopyOutcome::default()
    );

    // A copy that stops (its lease expires) is dropped too; the original runs on.
    let (_, late) = tail_with_a_straggler(&store, "copy-expires").await;
    let short = crate::timing(1);
    let copy = store
        .speculate("w3", 1, &POLICY, short)
        .await
        .unwrap()
        .remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.reap_expired(short).await.unwrap();
    assert_eq!(
        store.resolve_copies().await.unwrap(),
        CopyOutcome { won: 0, dropped: 1 }
    );
    assert_eq!(
        lease_state(&store, "w3", lease_ref(&copy)).await,
        LeaseState::Lost
    );
    assert_eq!(
        lease_state(&store, "slow", lease_ref(&late)).await,
        LeaseState::Held
    );
}

pub async fn no_copy_before_a_job_s_tail(store: DynMetastore) {
    let id = create(&store, "no-tail", "", 8).await;
    let slow = store.claim("slow", 1, long()).await.unwrap().remove(0);
    // Done shards that took a real time, so that shards just claimed are far from late
    // however loaded the machine is.
    let fast = store.claim("fast", 3, long()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for lease in fast {
        finish(&store, &lease).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Four shards are still pending: they go to idle workers first.
    assert!(
        store
            .speculate("w2", 1, &POLICY, long())
            .await
            .unwrap()
            .is_empty()
    );
    let rest = store.claim("fast", 4, long()).await.unwrap();
    assert_eq!(rest.len(), 4);
    // Five leased: more than the tail's four.
    assert!(
        store
            .speculate("w2", 1, &POLICY, long())
            .await
            .unwrap()
            .is_empty()
    );
    finish(&store, &rest[0]).await;
    let copy = store.speculate("w2", 4, &POLICY, long()).await.unwrap();
    assert_eq!(
        copy.iter()
            .map(|c| c.plan.file_row_start)
            .collect::<Vec<_>>(),
        [slow.plan.file_row_start]
    );
    assert_eq!(store.shard_counts(id).await.unwrap().0.copies, 1);
}
