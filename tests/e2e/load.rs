//! The load harness, bounded for CI: a small simulated fleet against a real `nightshift
//! coordinator` process over PostgreSQL. What it checks holds at any speed: every endpoint
//! answered, no call failed, no lease was lost while its holder heartbeat it, and the store
//! agrees with what the workers saw. (The 1,000-worker figures come from `nightshift-bench load`.)

use std::path::Path;
use std::time::Duration;

use nightshift_tests::load::{LoadPlan, LoadRig, print_report, simulate};

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

#[tokio::test(flavor = "multi_thread")]
async fn a_simulated_fleet_is_served_without_a_lost_lease() {
    let plan = LoadPlan {
        workers: 40,
        slots: 2,
        heartbeat_every: Duration::from_millis(250),
        checkpoint_every: Duration::from_millis(200),
        checkpoints_per_shard: 3,
        idle_poll: Duration::from_millis(100),
        ramp: Duration::from_millis(500),
        duration: Duration::from_secs(4),
    };
    let rig = LoadRig::start(Path::new(BIN), 2_000, plan.checkpoints_per_shard, false)
        .await
        .unwrap();
    let before = rig.db_counters().await.unwrap();
    let report = simulate(&rig, &plan).await.unwrap();
    print_report(&plan, &report, report.elapsed.as_secs_f64());
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    assert_eq!(report.leases_lost, 0);
    for endpoint in [
        "lease",
        "heartbeat",
        "checkpoint",
        "complete",
        "release",
        "specs",
    ] {
        let calls = report.latency.get(endpoint).map_or(0, |l| l.calls);
        assert!(calls > 0, "no `{endpoint}` call was made");
    }
    assert!(report.shards_completed > 0);
    assert_eq!(
        report.shards_granted,
        report.shards_completed + report.shards_released,
        "every granted shard was completed or handed back"
    );
    // Released shards are granted again to the next worker; nothing else is.
    assert_eq!(
        rig.regrants().await.unwrap(),
        0,
        "no shard was granted twice"
    );
    let after = rig.db_counters().await.unwrap();
    assert!(
        after.statements > before.statements,
        "pg_stat_statements counts"
    );
}
