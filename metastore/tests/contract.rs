//! The store contract: one suite of cases, each an async fn over a `DynMetastore`, run against a
//! fresh SQLite file and a fresh PostgreSQL database (its own throwaway server per test).

#[path = "contract/copies.rs"]
mod copies;
#[path = "contract/fleet.rs"]
mod fleet;
#[path = "contract/jobs.rs"]
mod jobs;
#[path = "contract/lease.rs"]
mod lease;
#[path = "contract/loops.rs"]
mod loops;
#[path = "contract/planning.rs"]
mod planning;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nightshift_metastore::postgres::PgStore;
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_metastore::{self, DynMetastore, LeaseTiming, Metastore, NewJob, Submitted};
use nightshift_proto::JobSpec;
use nightshift_proto::wire::{InputFile, JobPlan, LeaseRef, PartRecord, ShardLease, ShardPlan};
use nightshift_tests::PgServer;
use tempfile::TempDir;

/// Rows of every test shard.
pub const ROWS: u64 = 10;
/// A test that runs longer than this has hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// A store and whatever keeps it alive; fields drop in order (store, then server, then files).
struct Fixture {
    store: DynMetastore,
    _pg: Option<PgServer>,
    _dir: Option<TempDir>,
}

impl Fixture {
    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("store.db");
        let store = nightshift_metastore::open(&format!("sqlite://{}", path.display()))
            .await
            .expect("open sqlite store");
        Fixture {
            store,
            _pg: None,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Fixture {
        let pg = PgServer::start().await.expect("start postgres");
        let url = pg.fresh_database().await.expect("fresh database");
        let store = nightshift_metastore::open(&url)
            .await
            .expect("open postgres store");
        Fixture {
            store,
            _pg: Some(pg),
            _dir: None,
        }
    }
}

async fn run_case<F, Fut>(fixture: Fixture, case: F)
where
    F: FnOnce(DynMetastore) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::time::timeout(CASE_TIMEOUT, case(fixture.store.clone()))
        .await
        .expect("store contract case timed out");
}

/// Generates one test per case and backend: `on_sqlite::<case>` and `on_postgres::<case>`.
macro_rules! contract {
    ($($module:ident :: $case:ident),+ $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run_case(super::Fixture::sqlite().await, super::$module::$case).await;
                }
            )+
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run_case(super::Fixture::postgres().await, super::$module::$case)
                        .await;
                }
            )+
        }
    };
}

contract!(
    copies::a_copy_that_completes_first_wins_and_fences_the_original,
    copies::an_original_that_completes_first_drops_its_copy,
    copies::no_copy_before_a_job_s_tail,
    fleet::lease_time_is_kept_by_machine_whatever_ends_the_lease,
    fleet::workers_report_machines_and_drains_are_marked,
    fleet::workers_unseen_for_long_are_forgotten_unless_they_hold_a_lease,
    jobs::ready_after_migrate,
    jobs::create_and_read_back,
    jobs::idempotent_create,
    jobs::racing_idempotent_creates_make_one_job,
    jobs::cancel_and_retry,
    jobs::delete_removes_everything,
    jobs::large_job,
    jobs::outputs_are_owned,
    jobs::retry_drops_a_stale_finalizer_claim,
    jobs::a_cancelled_job_whose_files_were_removed_is_not_retried,
    jobs::jobs_are_listed_a_page_at_a_time_and_filtered,
    jobs::queued_jobs_start_by_priority_then_submission_up_to_the_limit,
    lease::claim_grants_each_shard_once,
    lease::claim_follows_priority_and_skips_stopped_jobs,
    lease::concurrent_claimers_never_share_a_shard,
    lease::claim_many_serves_requests_in_order,
    lease::concurrent_claim_many_calls_never_share_a_shard,
    lease::heartbeat_extends_and_reports,
    lease::heartbeat_many_answers_each_worker_as_alone,
    lease::checkpoint_many_answers_each_part_as_alone,
    lease::checkpoint_is_contiguous_and_fenced,
    lease::complete_needs_every_row,
    lease::complete_many_answers_each_lease,
    lease::retryable_failure_backs_off_then_dies,
    lease::permanent_failure_is_dead_at_once,
    lease::release_keeps_progress_and_attempts,
    lease::lease_holders_name_the_grant,
    lease::a_job_behind_a_large_one_of_equal_priority_is_served_at_the_next_claim,
    loops::expired_lease_is_reaped_and_fenced,
    loops::expiry_past_max_attempts_is_dead,
    loops::reaper_takes_every_expired_lease,
    loops::settle_moves_finished_jobs_on,
    loops::settle_fails_job_with_dead_shard,
    loops::error_threshold_fails_the_job,
    loops::finalize_claim_is_exclusive,
    loops::finalize_claim_is_renewed_and_given_up,
    loops::finalizer_serves_the_oldest_claim_first,
    loops::cancel_stops_a_commit,
    loops::merges_cover_the_rows_in_order_and_settling_waits_for_them,
    loops::merge_work_numbers_its_files_in_row_order,
    loops::metrics_count,
    loops::churn_commits_every_row_once,
    planning::a_job_planned_in_pieces_runs_before_its_plan_ends,
    planning::a_planning_failure_fails_the_job_and_a_retry_plans_on,
    planning::one_owner_plans_a_job_until_its_claim_expires,
    loops::recovery_after_a_crash_expires_every_claim_at_once,
    loops::callbacks_go_once_a_job_ends_and_again_after_a_retry,
    loops::schedules_fire_once_per_time_and_move_on_from_what_was_read,
    loops::the_dashboard_sees_rows_over_time_and_who_holds_what,
    loops::a_succeeded_jobs_garbage_is_pending_until_collected,
);

// Readiness before any migration: the one check that needs a store `open` did not migrate.

#[tokio::test]
async fn sqlite_is_not_ready_before_migrating() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"))
        .await
        .unwrap();
    assert!(!store.ready().await.unwrap());
    store.migrate().await.unwrap();
    assert!(store.ready().await.unwrap());
}

#[tokio::test]
async fn postgres_is_not_ready_before_migrating() {
    let pg = PgServer::start().await.unwrap();
    let store = PgStore::connect(&pg.fresh_database().await.unwrap())
        .await
        .unwrap();
    assert!(!store.ready().await.unwrap());
    store.migrate().await.unwrap();
    assert!(store.ready().await.unwrap());
}

/// Connections the coordinator's pools hold open on the database `url` names.
async fn coordinator_connections(url: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'nightshift-coordinator'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// A burst of concurrent reads, claims and heartbeats (every pool) never opens more
/// connections than the store was given; the default opens more for the same burst.
#[tokio::test]
async fn postgres_holds_no_more_connections_than_it_is_given() {
    let pg = PgServer::start().await.unwrap();
    use nightshift_metastore::postgres::{DEFAULT_CONNECTIONS, MIN_CONNECTIONS};
    for (connections, most) in [(MIN_CONNECTIONS, 3), (DEFAULT_CONNECTIONS, 28)] {
        let url = pg.fresh_database().await.unwrap();
        let store: DynMetastore = nightshift_metastore::open_with(&url, connections)
            .await
            .unwrap();
        let id = create(&store, "burst", "", 4).await;
        let calls = (0..32).map(|i| {
            let store = store.clone();
            async move {
                let worker = format!("w{i}");
                let leases = store.claim(&worker, 1, long()).await.unwrap();
                let refs: Vec<LeaseRef> = leases.iter().map(lease_ref).collect();
                store.heartbeat(&worker, &refs, long()).await.unwrap();
                store.job(id).await.unwrap().unwrap();
            }
        });
        futures::future::join_all(calls).await;
        let open = coordinator_connections(&url).await;
        assert!((1..=most).contains(&open), "{open} open of {connections}");
        if connections == MIN_CONNECTIONS {
            continue;
        }
        assert!(open > 3, "the burst wants more than three: {open}");
    }
}

// Helpers shared by the cases.

static NEXT_UID: AtomicU64 = AtomicU64::new(0);

/// A valid spec named `name`, with `extra` TOML put first (top-level keys such as `priority`,
/// then tables such as `[retry]` or `[errors]`).
pub fn spec(name: &str, extra: &str) -> JobSpec {
    let src = format!(
        r#"name = "{name}"
{extra}

[input]
uri = "s3://in/data/*.parquet"

[model]
uri = "s3://models/mlp.onnx"

[model.inputs]
x = "features"

[model.outputs]
logits = "logits"

[output]
uri = "s3://out/{name}/"
passthrough = ["id"]
"#
    );
    JobSpec::from_toml(&src).expect("valid test spec")
}

/// A plan of `shards` shards of `ROWS` rows over two files.
pub fn plan(shards: usize) -> JobPlan {
    let files = vec![
        InputFile {
            uri: "s3://in/data/a.parquet".into(),
            size: 1000,
            etag: Some("\"etag-a\"".into()),
        },
        InputFile {
            uri: "s3://in/data/b.parquet".into(),
            size: 2000,
            etag: None,
        },
    ];
    let shards = (0..shards)
        .map(|i| ShardPlan {
            file_index: (i % 2) as u32,
            row_group_start: (i / 2) as u32,
            row_group_end: (i / 2 + 1) as u32,
            file_row_start: (i / 2) as u64 * ROWS,
            rows: ROWS,
        })
        .collect::<Vec<_>>();
    JobPlan {
        files,
        rows_total: shards.len() as u64 * ROWS,
        shards,
    }
}

pub fn new_job(spec: JobSpec, shards: usize, key: Option<&str>) -> NewJob {
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    NewJob {
        uid: format!("{}-{}-{n}", spec.name, std::process::id()),
        spec,
        idempotency_key: key.map(str::to_owned),
        plan: plan(shards),
        queued: false,
        planning: false,
    }
}

/// Creates a running job of `shards` shards, with an output of its own, and returns its id.
pub async fn create(store: &DynMetastore, name: &str, extra: &str, shards: usize) -> i64 {
    let mut spec = spec(name, extra);
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed);
    spec.output.uri = format!("s3://out/{name}-{n}/");
    match store
        .create_job(new_job(spec, shards, None))
        .await
        .expect("create job")
    {
        Submitted::Created(job) => job.id,
        Submitted::Existing(job) => panic!("new job {} reported as existing", job.id),
    }
}

/// Lease timing with no backoff, so failed shards are claimable at once.
pub fn timing(ttl_ms: i64) -> LeaseTiming {
    LeaseTiming {
        ttl_ms,
        backoff_base_ms: 0,
        backoff_max_ms: 0,
    }
}

/// A long lease that does not expire during a test.
pub fn long() -> LeaseTiming {
    timing(60_000)
}

pub fn lease_ref(lease: &ShardLease) -> LeaseRef {
    lease.lease_ref()
}

pub fn part(lease: LeaseRef, row_start: u64, rows: u64) -> PartRecord {
    PartRecord {
        uri: format!(
            "s3://out/parts/{}-{row_start}-{rows}-{}.parquet",
            lease.shard_id, lease.token
        ),
        row_start,
        rows,
        bytes: rows.saturating_mul(100),
        error_rows: 0,
        error_uri: None,
        error_bytes: 0,
        tokens: None,
    }
}

/// Checkpoints every row of a lease and completes it.
pub async fn finish(store: &DynMetastore, lease: &ShardLease) {
    let l = lease_ref(lease);
    let start = lease.checkpoint_rows;
    if start < lease.plan.rows {
        store
            .checkpoint(l, &part(l, start, lease.plan.rows - start))
            .await
            .expect("checkpoint the rest");
    }
    store.complete(l).await.expect("complete");
}

/// Queues the merge work of a job whose row shards are all done, as the finalizer loop would
/// with a target no group reaches (one merge of every row), and does it like a worker.
pub async fn merge_all(store: &DynMetastore, job_id: i64) {
    let candidates = store.merge_candidates(job_id).await.expect("candidates");
    let groups = nightshift_metastore::merges::plan_groups(&candidates, u64::MAX);
    store.create_merges(job_id, &groups).await.expect("merges");
    for lease in store.claim("merger", 100, long()).await.expect("claim") {
        if lease.job_id == job_id && lease.merge.is_some() {
            finish(store, &lease).await;
        } else {
            store.release(lease_ref(&lease)).await.expect("release");
        }
    }
}

/// Asserts that a result is an error matching a pattern, and shows what it was otherwise.
#[macro_export]
macro_rules! assert_err {
    ($result:expr, $pattern:pat $(if $guard:expr)?) => {
        match $result {
            Err($pattern) $(if $guard)? => {}
            other => panic!(
                "expected Err({}), got {:?}",
                stringify!($pattern),
                other.map(|_| "Ok(..)")
            ),
        }
    };
}
