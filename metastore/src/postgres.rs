//! PostgreSQL: the production metastore, shared by every coordinator replica. What differs
//! from the shared SQL: submissions serialise on an advisory lock, claims and the reaper skip
//! rows another replica holds, and claims, heartbeats, completions and plans are one
//! set-based statement each (arrays in, one row per request out). Times come from the
//! database clock only (`ns_now_ms()`, defined by the first migration).

use std::collections::{BTreeSet, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use nightshift_proto::wire::{JobPlan, LeaseRef, LeaseStatus, PartRecord, ShardLease, ShardPlan};
use nightshift_proto::{JobState, ShardState};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgQueryResult};
use sqlx::{Pool, Postgres as PgDb};

use crate::records::{Granted, HolderRow};
use crate::sql::jobs::count;
use crate::sql::lease::HOLDER;
use crate::sql::{Dialect, SqlStore};
use crate::{
    ClaimRequest, HeartbeatLot, LeaseHolder, LeaseTiming, Result, StoreError, migrations,
    new_lease_secret, rules,
};

/// Connections per coordinator replica unless its `--db-connections` says otherwise: those of
/// the three pools below together. Every statement is short, so a few go a long way; a
/// database serving several replicas (or behind a server's `max_connections`) may want fewer.
pub const DEFAULT_CONNECTIONS: u32 = 28;
/// The fewest connections a replica can work with: one per pool.
pub const MIN_CONNECTIONS: u32 = 3;
/// Of every 7 connections, 4 are the general pool's, 2 the relaxed pool's and 1 the claims'.
/// The relaxed pool (`SqlStore::relaxed`) is for lease extensions, checkpoints and
/// completions. Their commits do not wait for the write-ahead log to reach the disk, so a slow
/// flush (hundreds of milliseconds at times on a cloud disk) no longer stalls every worker's
/// call. A crash of the database may lose the last few hundred milliseconds of them, never a
/// part of one, and never one that a later durable commit (a claim, a job's commit) followed.
/// What is lost is fenced work: a worker whose checkpoint or completion was lost is refused at
/// its next write (its checkpoint no longer matches, or its lease expired and was granted anew
/// under a higher token) and the shard is redone from its last durable checkpoint; parts that
/// were never durably recorded are never in a manifest. Claims stay durable (a lost claim
/// could hand its token out twice); their pool (`SqlStore::claims`) wants as many as the
/// coordinator has claim calls in flight.
const POOL_SHARES: (u32, u32, u32) = (4, 2, 1);

/// Statements on the relaxed and claim connections find their rows by id from arrays of
/// requests or through an index whatever the parameters, so one generic plan serves every
/// call as well as a custom one would. Left to choose, PostgreSQL planned each call afresh
/// (a claim cost more to plan than to run): a fifth of its CPU at 1,000 workers.
const GENERIC_PLANS: (&str, &str) = ("plan_cache_mode", "force_generic_plan");
/// How long a call waits for a free connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// The advisory lock that serialises the output check and insert of submissions and retries,
/// so two racing submissions cannot both find an output free.
const OUTPUT_LOCK: i64 = 0x6e73_6f75_7470_7574;
/// A job of at least this many shards may refresh the shards table's statistics at once.
const ANALYZE_MIN_SHARDS: usize = 1_000;
/// ... when its shards are at least this fraction of the rows the statistics last counted
/// (autovacuum's own default threshold for analysing a table).
const ANALYZE_FRACTION: f64 = 0.1;

/// The sizes of the general, relaxed and claims pools within `total` connections: each its
/// share, and at least one.
pub fn pool_sizes(total: u32) -> (u32, u32, u32) {
    let (general, relaxed, claims) = POOL_SHARES;
    let share = |n: u32| {
        let part = u64::from(total) * u64::from(n) / u64::from(general + relaxed + claims);
        u32::try_from(part).unwrap_or(u32::MAX).max(1)
    };
    let (relaxed, claims) = (share(relaxed), share(claims));
    let general = total.saturating_sub(relaxed + claims).max(1);
    (general, relaxed, claims)
}

/// The PostgreSQL dialect.
pub struct Postgres;

pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connects to the database a `postgres://` URL names, with `DEFAULT_CONNECTIONS`. Does
    /// not migrate.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, DEFAULT_CONNECTIONS).await
    }

    /// Connects with at most `connections` connections open at once (`pool_sizes`).
    pub async fn connect_with(url: &str, connections: u32) -> Result<Self> {
        let (general, relaxed, claims) = pool_sizes(connections);
        // Every statement here is short and reaches few rows; JIT compiling one whose estimate
        // passes `jit_above_cost` (a bulk insert, a scan over a stale estimate) costs tens or
        // hundreds of milliseconds of CPU for nothing.
        let opts = PgConnectOptions::from_str(url)?
            .application_name("nightshift-coordinator")
            .options([("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(general)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts.clone())
            .await?;
        let relaxed = PgPoolOptions::new()
            .max_connections(relaxed)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(
                opts.clone()
                    .options([("synchronous_commit", "off"), GENERIC_PLANS]),
            )
            .await?;
        let claims = PgPoolOptions::new()
            .max_connections(claims)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts.options([GENERIC_PLANS]))
            .await?;
        Ok(Self {
            pool,
            relaxed,
            claims,
        })
    }
}

/// A granted shard and the request it answers.
#[derive(sqlx::FromRow)]
struct Answer {
    #[sqlx(flatten)]
    granted: Granted,
    request: i64,
}

#[async_trait]
impl Dialect for Postgres {
    type DB = PgDb;
    type Args = sqlx::postgres::PgArguments;
    type Ex<'c> = &'c mut PgConnection;

    const NOW: &'static str = "ns_now_ms()";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    // NO KEY UPDATE: blocks other job transitions, not workers inserting parts.
    const LOCK_ROW: &'static str = " FOR NO KEY UPDATE";
    const MIGRATED: &'static str = "SELECT to_regclass('_sqlx_migrations') IS NOT NULL";

    fn ex(conn: &mut PgConnection) -> &mut PgConnection {
        conn
    }

    fn affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn migrator() -> sqlx::migrate::Migrator {
        migrations::postgres()
    }

    async fn migrate(pool: &Pool<PgDb>) -> Result<()> {
        // sqlx takes an advisory lock, so replicas starting together migrate once.
        migrations::postgres().run(pool).await?;
        Ok(())
    }

    async fn lock_outputs(conn: &mut PgConnection) -> Result<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(OUTPUT_LOCK)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Files and shards go in as arrays: one statement each, whatever the shard count, shard ids
    /// in plan order.
    async fn insert_plan(
        conn: &mut PgConnection,
        job_id: i64,
        plan: &JobPlan,
        first_file: u64,
    ) -> Result<()> {
        let files = &plan.files;
        sqlx::query(
            "INSERT INTO input_files (job_id, idx, uri, size, etag) \
             SELECT $1, $5 + f.ord - 1, f.uri, f.size, f.etag \
             FROM unnest($2::TEXT[], $3::BIGINT[], $4::TEXT[]) WITH ORDINALITY \
                  AS f(uri, size, etag, ord)",
        )
        .bind(job_id)
        .bind(files.iter().map(|f| f.uri.as_str()).collect::<Vec<_>>())
        .bind(files.iter().map(|f| count(f.size)).collect::<Vec<_>>())
        .bind(files.iter().map(|f| f.etag.as_deref()).collect::<Vec<_>>())
        .bind(count(first_file))
        .execute(&mut *conn)
        .await?;
        let column = |f: fn(&ShardPlan) -> i64| -> Vec<i64> { plan.shards.iter().map(f).collect() };
        sqlx::query(
            "INSERT INTO shards (job_id, file_index, row_group_start, row_group_end, \
             file_row_start, rows) \
             SELECT $1, s.file_index, s.rg_start, s.rg_end, s.row_start, s.rows \
             FROM unnest($2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[]) \
                  WITH ORDINALITY AS s(file_index, rg_start, rg_end, row_start, rows, ord) \
             ORDER BY s.ord",
        )
        .bind(job_id)
        .bind(column(|s| i64::from(s.file_index)))
        .bind(column(|s| i64::from(s.row_group_start)))
        .bind(column(|s| i64::from(s.row_group_end)))
        .bind(column(|s| count(s.file_row_start)))
        .bind(column(|s| count(s.rows)))
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn after_create(store: &PgStore, shards: usize) {
        refresh_statistics(store, shards).await
    }

    /// Claims for several requests in one statement: the shards it takes are handed out in claim
    /// order, the first request's `max` first, then the next one's.
    ///
    /// `slot` numbers the shards wanted, request by request (`$1` the worker and `$2` the request
    /// of each); `picked` numbers the pending shards taken, in claim order; each slot gets the
    /// shard of its number. The claim visits the running jobs (few) in the order claims serve them
    /// (`rules::serve_order`: priority, then the fewest leased shards), and takes each
    /// one's pending shards in id order from `shards_job (job_id, state, id)` until it has enough,
    /// so it reads about the shards it takes however many are pending. The job list stays a sorted
    /// subquery (PostgreSQL does not flatten one with ORDER BY), so the nested loop visits jobs in
    /// that order and stops. `state` is matched as a range, not an equality, so the planner cannot
    /// treat it as a constant and drop it from ORDER BY: only `shards_job` yields (state, id)
    /// order, so no plan can walk the primary key past finished shards when statistics are stale.
    ///
    /// The limit is written into the text rather than bound, so that the one plan each text gets
    /// is made for its limit. Rounded up to a power of two so that few texts exist, each is a
    /// prepared statement of the claim connections, which keep one generic plan per statement
    /// (`GENERIC_PLANS`): left to choose, PostgreSQL planned every claim afresh, at more cost than
    /// running it. Shards locked past the last slot are left as they were. Workers are noted in
    /// name order, so that two claims never wait on each other's rows in opposite orders. The
    /// slots are spelled out in Rust rather than in SQL (`generate_series` per request): then the
    /// generic plan's estimates are close to any call's.
    async fn claim_many(
        store: &PgStore,
        requests: &[ClaimRequest],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<ShardLease>>> {
        let mut answers: Vec<Vec<ShardLease>> = vec![Vec::new(); requests.len()];
        let slots: u64 = requests.iter().map(|r| u64::from(r.max)).sum();
        if slots == 0 {
            return Ok(answers);
        }
        let limit = slots.next_power_of_two();
        let order = rules::serve_order("$7", "$8");
        let sql = format!(
            "WITH slot AS ( \
               SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $5::TEXT[]) WITH ORDINALITY \
                 AS u(worker, request, secret, n) \
             ), seen AS ( \
               INSERT INTO workers (id, last_seen_ms) \
               SELECT w, ns_now_ms() FROM unnest($3::TEXT[]) AS w \
               ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms \
             ), picked AS ( \
               SELECT q.id, row_number() OVER () AS n FROM ( \
                 SELECT p.id FROM ( \
                   SELECT id FROM jobs WHERE state = $7 ORDER BY {order} \
                 ) j CROSS JOIN LATERAL ( \
                   SELECT s.id FROM shards s \
                   WHERE s.job_id = j.id AND s.state >= $6 AND s.state <= $6 \
                     AND s.not_before_ms <= (SELECT ns_now_ms()) \
                   ORDER BY s.state, s.id LIMIT {limit} \
                   FOR UPDATE SKIP LOCKED \
                 ) p \
                 LIMIT {limit} \
               ) q \
             ), claimed AS ( \
               UPDATE shards s SET state = $8, token = s.token + 1, \
                 attempts = s.attempts + 1, worker_id = slot.worker, \
                 lease_secret = slot.secret, lease_expires_at_ms = ns_now_ms() + $4 \
               FROM picked JOIN slot ON slot.n = picked.n \
               WHERE s.id = picked.id \
               RETURNING s.*, slot.request, slot.n \
             ) \
             SELECT s.*, j.uid, j.spec_json, j.spec_hash, f.uri, f.size, f.etag \
             FROM claimed s JOIN jobs j ON j.id = s.job_id \
             JOIN input_files f ON f.job_id = s.job_id AND f.idx = s.file_index \
             ORDER BY s.n"
        );
        let mut slot_workers: Vec<&str> = Vec::with_capacity(slots as usize);
        let mut slot_requests: Vec<i64> = Vec::with_capacity(slots as usize);
        let mut slot_secrets: Vec<String> = Vec::with_capacity(slots as usize);
        for (i, r) in requests.iter().enumerate() {
            let secret = new_lease_secret().to_hex();
            for _ in 0..r.max {
                slot_workers.push(&r.worker);
                slot_requests.push(i as i64);
                slot_secrets.push(secret.clone());
            }
        }
        let mut workers: Vec<&str> = requests.iter().map(|r| r.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        let mut conn = store.claims.acquire().await?;
        let rows: Vec<Answer> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(slot_workers)
            .bind(slot_requests)
            .bind(workers)
            .bind(timing.ttl_ms)
            .bind(slot_secrets)
            .bind(ShardState::Pending.as_str())
            .bind(JobState::Running.as_str())
            .bind(ShardState::Leased.as_str())
            .fetch_all(&mut *conn)
            .await?;
        let mut by_request: Vec<Vec<Granted>> = (0..requests.len()).map(|_| Vec::new()).collect();
        for a in rows {
            usize::try_from(a.request)
                .ok()
                .and_then(|i| by_request.get_mut(i))
                .ok_or_else(|| StoreError::Corrupt("claim answered an unknown request".into()))?
                .push(a.granted);
        }
        for (answer, granted) in answers.iter_mut().zip(by_request) {
            *answer = PgStore::leases(&mut conn, granted).await?;
        }
        Ok(answers)
    }

    /// One statement for all the requests' leases, and their workers seen. It changes only
    /// `lease_expires_at_ms`, which no index holds, so the updates stay HOT. A lease it did not
    /// extend costs a read, to say why.
    async fn heartbeat_many(
        store: &PgStore,
        requests: &[HeartbeatLot],
        timing: LeaseTiming,
    ) -> Result<Vec<Vec<LeaseStatus>>> {
        // Sorted and once each: rows of `workers` are locked in one order by every statement.
        let workers: BTreeSet<&str> = requests.iter().map(|r| r.worker.as_str()).collect();
        let leases: Vec<LeaseRef> = requests
            .iter()
            .flat_map(|r| r.leases.iter().copied())
            .collect();
        let (ids, tokens) = columns(&leases);
        let mut conn = store.relaxed.acquire().await?;
        let extended: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(per_lease(
            "seen AS ( \
               INSERT INTO workers (id, last_seen_ms) SELECT w, ns_now_ms() FROM unnest($1::TEXT[]) AS u(w) \
               ON CONFLICT (id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms \
             ), ",
            ("$2", "$3"),
            "UPDATE shards s SET lease_expires_at_ms = ns_now_ms() + $4 FROM req r, jobs j \
             WHERE s.state = (SELECT $5::TEXT) AND j.id = s.job_id AND j.state = $6",
        )))
        .bind(workers.into_iter().collect::<Vec<_>>())
        .bind(ids)
        .bind(tokens)
        .bind(timing.ttl_ms)
        .bind(ShardState::Leased.as_str())
        .bind(JobState::Running.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let mut extended = extended.into_iter();
        let mut answers = Vec::with_capacity(requests.len());
        for r in requests {
            let mut statuses = Vec::with_capacity(r.leases.len());
            for &l in &r.leases {
                let held = extended.next().unwrap_or(false);
                statuses.push(PgStore::heartbeat_status(&mut conn, l, held).await?);
            }
            answers.push(statuses);
        }
        Ok(answers)
    }

    /// `checkpoint_many` in one transaction of one statement per wave: a wave takes each shard
    /// once (a lot rarely names one twice; a second checkpoint of it goes in the next wave, after
    /// the first). Poison rows are counted against their jobs' thresholds once the wave is in.
    async fn checkpoint_many(
        store: &PgStore,
        checkpoints: &[(LeaseRef, PartRecord)],
    ) -> Result<Vec<Result<()>>> {
        let mut tx = store.relaxed.begin().await?;
        let mut answers: Vec<Result<()>> = checkpoints.iter().map(|_| Ok(())).collect();
        let mut left: Vec<usize> = (0..checkpoints.len()).collect();
        while !left.is_empty() {
            let mut named = HashSet::new();
            let (wave, rest): (Vec<usize>, Vec<usize>) = left
                .into_iter()
                .partition(|&i| named.insert(checkpoints[i].0.shard_id));
            let recorded = record_parts(&mut tx, checkpoints, &wave).await?;
            let mut poisoned = BTreeSet::new();
            for (&i, job) in wave.iter().zip(recorded) {
                let (lease, part) = &checkpoints[i];
                match job {
                    Some(job) if part.error_rows > 0 => {
                        poisoned.insert(job);
                    }
                    Some(_) => {}
                    None => {
                        let row = PgStore::lease_row(&mut tx, lease.shard_id).await?;
                        answers[i] = Err(rules::checkpoint_refused(row.as_ref(), *lease, part));
                    }
                }
            }
            for job in poisoned {
                PgStore::check_error_rows(&mut tx, job).await?;
            }
            left = rest;
        }
        tx.commit().await?;
        Ok(answers)
    }

    /// `complete` for several leases in one statement; only the leases it did not finish cost a
    /// read each, to say why.
    async fn complete_many(store: &PgStore, leases: &[LeaseRef]) -> Result<Vec<Result<()>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = columns(leases);
        let mut conn = store.relaxed.acquire().await?;
        let finished: Vec<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(per_lease(
            "",
            ("$1", "$2"),
            "UPDATE shards s SET state = $3, lease_expires_at_ms = NULL, worker_id = NULL \
             FROM req r WHERE s.state = (SELECT $4::TEXT) AND s.checkpoint_rows = s.rows",
        )))
        .bind(ids)
        .bind(tokens)
        .bind(ShardState::Done.as_str())
        .bind(ShardState::Leased.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let mut answers = Vec::with_capacity(leases.len());
        let mut seen = HashSet::with_capacity(leases.len());
        for (&lease, finished) in leases.iter().zip(finished) {
            // A lease named again answers as a second `complete` would: the first one took it.
            answers.push(match (finished, seen.insert(lease)) {
                (true, true) => Ok(()),
                (true, false) => Err(StoreError::LeaseLost {
                    shard_id: lease.shard_id,
                    token: lease.token,
                }),
                (false, _) => {
                    let row = PgStore::lease_row(&mut conn, lease.shard_id).await?;
                    rules::completion_refused(row.as_ref(), lease)
                }
            });
        }
        Ok(answers)
    }

    async fn lease_holders(store: &PgStore, shard_ids: &[i64]) -> Result<Vec<LeaseHolder>> {
        let rows: Vec<HolderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{HOLDER} WHERE s.id = ANY($1) AND s.state = $2"
        )))
        .bind(shard_ids)
        .bind(ShardState::Leased.as_str())
        .fetch_all(&store.relaxed)
        .await?;
        rows.into_iter().map(LeaseHolder::try_from).collect()
    }
}

/// A job that is a large part of the shards table changes what the planner should expect
/// of it. Autovacuum notices within about a minute; until then claims would be planned for a
/// table that is no longer there (a never-analysed table looks empty, and a claim planned for
/// an empty table sorts every pending shard). So refresh the statistics now. The job is
/// committed already: a failure here is logged, not returned.
async fn refresh_statistics(store: &PgStore, new_shards: usize) {
    if new_shards < ANALYZE_MIN_SHARDS {
        return;
    }
    let analyzed = async {
        let counted: f32 =
            sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'shards'::regclass")
                .fetch_one(&store.pool)
                .await?;
        // -1: never analysed.
        if counted < 0.0 || new_shards as f64 >= ANALYZE_FRACTION * f64::from(counted) {
            sqlx::query("ANALYZE shards").execute(&store.pool).await?;
        }
        Ok::<_, sqlx::Error>(())
    };
    if let Err(e) = analyzed.await {
        tracing::warn!(error = %e, "refreshing the shards table's statistics failed");
    }
}

/// Moves the checkpoint of each shard of `wave` (indices into `checkpoints`, each shard once)
/// past its part and records the part, in one statement, under the same guard as
/// `checkpoint`: the lease's token, the shard leased, its job running, the part starting at
/// the checkpoint and ending inside the shard. Answers per checkpoint, in order, the job of
/// the part recorded, or `None` for a refused one.
async fn record_parts(
    conn: &mut PgConnection,
    checkpoints: &[(LeaseRef, PartRecord)],
    wave: &[usize],
) -> Result<Vec<Option<i64>>> {
    let column = |f: &dyn Fn(&(LeaseRef, PartRecord)) -> u64| -> Vec<i64> {
        wave.iter().map(|&i| count(f(&checkpoints[i]))).collect()
    };
    let ids: Vec<i64> = wave.iter().map(|&i| checkpoints[i].0.shard_id).collect();
    let tokens: Vec<i64> = wave.iter().map(|&i| checkpoints[i].0.token).collect();
    let uris: Vec<&str> = wave
        .iter()
        .map(|&i| checkpoints[i].1.uri.as_str())
        .collect();
    let error_uris: Vec<Option<&str>> = wave
        .iter()
        .map(|&i| checkpoints[i].1.error_uri.as_deref())
        .collect();
    let tokens_of = |c: &(LeaseRef, PartRecord)| c.1.tokens.unwrap_or_default();
    Ok(sqlx::query_scalar(
        "WITH req AS ( \
           SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], \
             $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[], $9::TEXT[], $10::BIGINT[], \
             $11::BIGINT[], $12::BIGINT[], $13::BIGINT[]) WITH ORDINALITY \
             AS r(shard_id, token, row_start, row_end, rows, error_rows, bytes, uri, error_uri, \
               error_bytes, real_tokens, padded_tokens, truncated_rows, ord) \
         ), moved AS ( \
           UPDATE shards s SET checkpoint_rows = s.checkpoint_rows + r.rows, \
             error_rows = s.error_rows + r.error_rows \
           FROM req r \
           WHERE s.id = r.shard_id AND s.token = r.token AND s.state = (SELECT $14::TEXT) \
             AND s.checkpoint_rows = r.row_start AND r.rows > 0 AND r.row_end <= s.rows \
             AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.job_id AND j.state = $15) \
           RETURNING s.id, s.job_id \
         ), recorded AS ( \
           INSERT INTO parts (job_id, shard_id, token, row_start, rows, bytes, uri, \
             error_rows, error_uri, error_bytes, real_tokens, padded_tokens, truncated_rows, \
             created_at_ms) \
           SELECT m.job_id, r.shard_id, r.token, r.row_start, r.rows, r.bytes, r.uri, \
             r.error_rows, r.error_uri, r.error_bytes, r.real_tokens, r.padded_tokens, \
             r.truncated_rows, ns_now_ms() \
           FROM req r JOIN moved m ON m.id = r.shard_id \
           RETURNING shard_id \
         ) \
         SELECT m.job_id FROM req r LEFT JOIN moved m ON m.id = r.shard_id ORDER BY r.ord",
    )
    .bind(ids)
    .bind(tokens)
    .bind(column(&|c| c.1.row_start))
    .bind(column(&|c| c.1.row_start.saturating_add(c.1.rows)))
    .bind(column(&|c| c.1.rows))
    .bind(column(&|c| c.1.error_rows))
    .bind(column(&|c| c.1.bytes))
    .bind(uris)
    .bind(error_uris)
    .bind(column(&|c| c.1.error_bytes))
    .bind(column(&|c| tokens_of(c).real))
    .bind(column(&|c| tokens_of(c).padded))
    .bind(column(&|c| tokens_of(c).truncated_rows))
    .bind(ShardState::Leased.as_str())
    .bind(JobState::Running.as_str())
    .fetch_all(&mut *conn)
    .await?)
}

/// A guarded `update` of each lease of the arrays `(ids, tokens)`, over the shard `s` and the
/// request `r`, after the common table expressions `before`: answers per lease, in order,
/// whether it changed the shard under that token.
///
/// The update must reach its shards by primary key, a few rows whatever the table holds. So it
/// compares the shard's state with a subquery (`s.state = (SELECT $n::TEXT)`), a value the
/// planner does not know: otherwise it may walk a partial index such as `shards_leased`,
/// whose statistics (gathered when a job's shards were all pending) say it holds one row,
/// and read every leased shard of the cluster for each heartbeat.
fn per_lease(before: &str, (ids, tokens): (&str, &str), update: &str) -> String {
    format!(
        "WITH {before}req AS ( \
           SELECT * FROM unnest({ids}::BIGINT[], {tokens}::BIGINT[]) WITH ORDINALITY \
             AS r(shard_id, token, ord) \
         ), changed AS ( \
           {update} AND s.id = r.shard_id AND s.token = r.token RETURNING s.id, s.token \
         ) \
         SELECT EXISTS (SELECT 1 FROM changed c WHERE c.id = r.shard_id AND c.token = r.token) \
         FROM req r ORDER BY r.ord"
    )
}

/// Shard ids and tokens of leases, as two arrays.
fn columns(leases: &[LeaseRef]) -> (Vec<i64>, Vec<i64>) {
    leases.iter().map(|l| (l.shard_id, l.token)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_are_shared_among_the_pools_each_with_at_least_one() {
        assert_eq!(pool_sizes(DEFAULT_CONNECTIONS), (16, 8, 4));
        assert_eq!(pool_sizes(7), (4, 2, 1));
        assert_eq!(pool_sizes(MIN_CONNECTIONS), (1, 1, 1));
        for total in MIN_CONNECTIONS..200 {
            let (general, relaxed, claims) = pool_sizes(total);
            assert_eq!(general + relaxed + claims, total, "{total}");
            assert!(
                general >= relaxed && relaxed >= claims && claims >= 1,
                "{total}"
            );
        }
        let (general, _, _) = pool_sizes(u32::MAX);
        assert!(general > 0);
    }
}
