//! The fleet's state: the machine each worker reports, drains, and each lease's time kept by
//! machine when the lease ends (the triggers of migration 0009), whatever ends it.

use std::time::Duration;

use nightshift_metastore::{DynMetastore, UsageSum, WorkerMachine};
use nightshift_proto::{CapacityType, InstanceInfo};

use crate::{create, finish, lease_ref, long, part, timing};

fn machine(id: &str, capacity_type: CapacityType, slots: u32, gpus: u32) -> WorkerMachine {
    WorkerMachine {
        instance: Some(InstanceInfo {
            id: id.into(),
            instance_type: "g5.xlarge".into(),
            capacity_type,
        }),
        slots,
        gpus,
    }
}

fn usage_of<'a>(usage: &'a [UsageSum], kind: &str) -> &'a UsageSum {
    usage
        .iter()
        .find(|u| u.capacity_type.as_deref() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} usage in {usage:?}"))
}

pub async fn lease_time_is_kept_by_machine_whatever_ends_the_lease(store: DynMetastore) {
    let id = create(&store, "costly", "", 4).await;
    let spot = machine("i-spot", CapacityType::Spot, 2, 2);
    let on_demand = machine("i-od", CapacityType::OnDemand, 1, 1);
    store.note_machine("spot-w", &spot).await.unwrap();
    store.note_machine("od-w", &on_demand).await.unwrap();
    let done = store.claim("spot-w", 1, long()).await.unwrap().remove(0);
    let mut held = store.claim("od-w", 3, timing(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Completed: all its time kept, none lost.
    finish(&store, &done).await;
    // Released after a checkpoint: lost only the time since it (none here).
    let released = held.remove(0);
    let l = lease_ref(&released);
    store.checkpoint(l, &part(l, 0, 4)).await.unwrap();
    store.release(l).await.unwrap();
    // The other two expire and are reaped with nothing checkpointed: all of it lost.
    assert_eq!(held.len(), 2);
    assert_eq!(store.reap_expired(timing(300)).await.unwrap(), 2);
    let usage = store.job_usage(id).await.unwrap();
    let s = usage_of(&usage, "spot");
    assert_eq!((s.slots, s.gpus, s.lost_ms), (2, 2, 0), "{usage:?}");
    assert!(s.held_ms >= 400, "{usage:?}");
    let od = usage_of(&usage, "on-demand");
    assert_eq!((od.slots, od.gpus), (1, 1));
    // Three on-demand leases of at least 400 ms each; the two that expired lost all theirs.
    assert!(od.held_ms >= 3 * 400, "{usage:?}");
    assert!(
        od.lost_ms >= 2 * 400 && od.lost_ms < od.held_ms,
        "{usage:?}"
    );
    // A lease held now counts up to now, and loses nothing yet.
    store
        .note_machine(
            "later",
            &WorkerMachine {
                instance: None,
                slots: 1,
                gpus: 0,
            },
        )
        .await
        .unwrap();
    let open = store.claim("later", 1, long()).await.unwrap();
    assert_eq!(open.len(), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let usage = store.job_usage(id).await.unwrap();
    let unknown = usage
        .iter()
        .find(|u| u.capacity_type.is_none())
        .unwrap_or_else(|| panic!("no usage of the unknown machine in {usage:?}"));
    assert!(unknown.held_ms >= 50 && unknown.lost_ms == 0, "{usage:?}");
}

pub async fn workers_report_machines_and_drains_are_marked(store: DynMetastore) {
    create(&store, "fleet", "", 1).await;
    let spot = machine("i-1", CapacityType::Spot, 1, 1);
    store.note_machine("w1", &spot).await.unwrap();
    assert!(!store.request_drain("nobody").await.unwrap());
    assert!(store.draining_workers(60_000).await.unwrap().is_empty());
    assert!(store.request_drain("w1").await.unwrap());
    assert!(
        store.request_drain("w1").await.unwrap(),
        "asking twice is fine"
    );
    assert_eq!(store.draining_workers(60_000).await.unwrap(), vec!["w1"]);
    let seen = store.workers_seen(60_000).await.unwrap();
    let w1 = seen.iter().find(|w| w.id == "w1").expect("w1 seen");
    assert_eq!(w1.instance_id.as_deref(), Some("i-1"));
    assert_eq!(w1.instance_type.as_deref(), Some("g5.xlarge"));
    assert_eq!(w1.capacity_type.as_deref(), Some("spot"));
    assert_eq!(w1.slots, Some(1));
    assert!(w1.draining);
    // A worker that says it moved (a new claim) is updated in place.
    let moved = machine("i-2", CapacityType::OnDemand, 4, 0);
    store.note_machine("w1", &moved).await.unwrap();
    let seen = store.workers_seen(60_000).await.unwrap();
    let w1 = seen.iter().find(|w| w.id == "w1").expect("w1 seen");
    assert_eq!(w1.instance_id.as_deref(), Some("i-2"));
    assert_eq!(w1.capacity_type.as_deref(), Some("on-demand"));
    assert_eq!(w1.slots, Some(4));
}

/// Workers long unseen are forgotten, unless they hold a lease.
pub async fn workers_unseen_for_long_are_forgotten_unless_they_hold_a_lease(store: DynMetastore) {
    create(&store, "forgetting", "", 1).await;
    let spot = machine("i-1", CapacityType::Spot, 1, 1);
    for w in ["idle", "busy"] {
        store.note_machine(w, &spot).await.unwrap();
    }
    assert_eq!(store.claim("busy", 1, long()).await.unwrap().len(), 1);
    assert_eq!(
        store.forget_workers(60_000).await.unwrap(),
        0,
        "seen just now"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.forget_workers(10).await.unwrap(), 1);
    let seen: Vec<String> = store
        .workers_seen(60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(seen, ["busy"]);
}
