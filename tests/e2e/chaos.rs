//! Chaos: PostgreSQL, the local S3 server behind a fault proxy (5% of requests delayed, throttled,
//! failed or reset), a coordinator and several workers. Workers are SIGKILLed at random moments
//! and SIGTERMed now and then, the coordinator is restarted twice and PostgreSQL crashes once
//! (an immediate shutdown, losing the relaxed commits not yet in its WAL); the output must
//! still be exactly the reference. Prints kills, restarts, rows recomputed and the
//! slowdown against an undisturbed run of the same job on the same cluster.
//!
//! CI mode (the default) stays well under five minutes. `NIGHTSHIFT_CHAOS=long` runs a bigger
//! job with more kills, by hand:
//!   NIGHTSHIFT_CHAOS=long cargo test -p nightshift --test chaos -- --nocapture

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nightshift_tests::PgServer;
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc, rows_inferred};
use nightshift_tests::fault_proxy::{FaultPlan, FaultProxy};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{nightshift, run};
use nightshift_tests::s3::{S3Server, env_for};
use nightshift_tests::verify::verify_output_with;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// How often the chaos run's state is asked.
const POLL: Duration = Duration::from_millis(200);
/// One event in this many is a SIGTERM (a drain), the others SIGKILLs.
const TERM_EVERY: u32 = 6;

/// Sets its flag when dropped, also on a panic: it stops the state poller, which the scope
/// would otherwise wait for.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Mode {
    rows: u64,
    workers: usize,
    min_kills: u32,
    hidden: &'static str,
}

fn mode() -> Mode {
    if std::env::var("NIGHTSHIFT_CHAOS").is_ok_and(|v| v == "long") {
        Mode {
            rows: 400_000,
            workers: 4,
            min_kills: 80,
            hidden: "2048",
        }
    } else {
        Mode {
            rows: 400_000,
            workers: 3,
            min_kills: 20,
            hidden: "2048",
        }
    }
}

/// The job's state and rows done, as `nightshift status` tells them.
fn job_state(coordinator: &str, job: &str) -> Option<(String, u64)> {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.args([
        "status",
        job,
        "--coordinator",
        coordinator,
        "--token",
        SUBMIT_TOKEN,
        "--json",
    ]);
    let o = run(cmd, Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let state = v["state"].as_str()?.to_string();
    Some((state, v["rows_done"].as_u64()?))
}

fn submit(f: &Fixture, coordinator: &str, spec: &Path, envs: &[(&str, String)]) {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path()).arg("submit").arg(spec).args([
        "--coordinator",
        coordinator,
        "--token",
        SUBMIT_TOKEN,
    ]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let o = run(cmd, Duration::from_secs(120));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn chaos_leaves_the_output_exact() {
    let m = mode();
    let f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // PostgreSQL crashes rather than restarts: the relaxed commits (checkpoints, lease
    // extensions, completions) whose WAL was still in memory are lost, as in production.
    let mut pg = rt.block_on(PgServer::start_crashable()).unwrap();
    let url = rt.block_on(pg.fresh_database()).unwrap();
    let s3 = rt.block_on(S3Server::start()).unwrap();
    rt.block_on(s3.create_bucket("lake")).unwrap();
    let data = f.data(
        "in",
        &[
            "--rows",
            &m.rows.to_string(),
            "--files",
            "4",
            "--row-group-rows",
            "2000",
        ],
    );
    let model = f.model("m.onnx", &["--hidden", m.hidden]);
    rt.block_on(s3.upload_dir(&data, "s3://lake/in/")).unwrap();
    rt.block_on(s3.put("s3://lake/models/m.onnx", std::fs::read(&model).unwrap()))
        .unwrap();
    let proxy = FaultProxy::start(s3.addr(), FaultPlan::new(2026, 0.05)).unwrap();
    let via_proxy: Vec<(String, String)> = env_for(&proxy.endpoint())
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let debug: Vec<(String, String)> = via_proxy
        .iter()
        .cloned()
        .chain([(
            "RUST_LOG".to_string(),
            "warn,nightshift_worker=debug".to_string(),
        )])
        .collect();
    let extra = "[batch]\nsize = 500\n[shards]\nrows = 4000\ncheckpoint_rows = 1000\n[retry]\nmax_attempts = 100\n";
    let spec = |name: &str| {
        let toml = spec_toml(
            name,
            "s3://lake/in/*.parquet",
            Path::new("s3://lake/models/m.onnx"),
            Path::new(&format!("s3://lake/out/{name}/")),
            extra,
        );
        f.spec(&format!("{name}.toml"), &toml)
    };
    let mut coordinator = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coordinator",
        &url,
        &[
            "--lease-ttl",
            "2s",
            "--retry-backoff",
            "100ms",
            "--retry-backoff-max",
            "1s",
            "--allow-uri",
            "s3://lake/",
        ],
        &via_proxy,
    );
    let worker_args = ["--drain-timeout", "30s", "--spot-metadata", "off"];
    let start_worker = |name: String, coordinator: &str| {
        WorkerProc::start(
            Path::new(BIN),
            f.dir.path(),
            &name,
            coordinator,
            &worker_args,
            &debug,
        )
    };

    // The undisturbed run: the same job on the same cluster, with the same faults.
    let calm_started = Instant::now();
    {
        let calm: Vec<WorkerProc> = (0..m.workers)
            .map(|i| start_worker(format!("calm-{i}"), &coordinator.url()))
            .collect();
        submit(&f, &coordinator.url(), &spec("calm"), &[]);
        let deadline = Instant::now() + Duration::from_secs(240);
        while job_state(&coordinator.url(), "calm").is_none_or(|(state, _)| state != "succeeded") {
            assert!(
                Instant::now() < deadline,
                "undisturbed run did not finish: {}",
                calm[0].log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let calm_took = calm_started.elapsed();

    // The chaos run.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut serial = 0;
    let mut next_name = || {
        serial += 1;
        format!("chaos-{serial}")
    };
    let mut workers: Vec<(WorkerProc, Instant)> = (0..m.workers)
        .map(|_| {
            (
                start_worker(next_name(), &coordinator.url()),
                Instant::now(),
            )
        })
        .collect();
    let mut logs: Vec<PathBuf> = Vec::new();
    let started = Instant::now();
    submit(&f, &coordinator.url(), &spec("chaos"), &[]);
    let (mut kills, mut terms, mut coordinator_restarts, mut pg_restarts) =
        (0u32, 0u32, 0u32, 0u32);
    let deadline = started + Duration::from_secs(if m.min_kills > 20 { 1500 } else { 220 });
    // The restarts come at shares of the rows done, not of the calm run's time: a chaos run
    // faster than expected cannot end before them.
    let mut planned = vec![
        (0.25, "coordinator"),
        (0.45, "postgres"),
        (0.65, "coordinator"),
    ];
    // Kills and drains spread evenly over the first half of the undisturbed run's length, then
    // none: enough for the count (a chaos run lasts little longer than a calm one), without
    // killing every worker before it gets going. With one event in TERM_EVERY a drain, the
    // budget holds min_kills + 5 kills; a restart takes about a second, hence the floor. A fresh
    // worker ripens for 1.5 s, so three workers allow about 1.5 events a second: at 300,000
    // rows the job ended with 27 events in a CI run (18.5 s), and here with the last one
    // (22 s); at 400,000 the calm run takes about 20 s.
    let budget = m.min_kills + 10;
    let every = Duration::from_secs_f64((calm_took.as_secs_f64() * 0.5 / budget as f64).max(0.3));
    // The job's state is polled by a thread of its own: asking it is a process, and with one per
    // turn of the kill loop a CI run had room for only 27 of its 30 events.
    let chaos_state = Mutex::new(None::<(String, u64)>);
    let stop_polling = AtomicBool::new(false);
    let url = coordinator.url();
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop_polling);
        s.spawn(|| {
            while !stop_polling.load(Ordering::Relaxed) {
                let state = job_state(&url, "chaos");
                *chaos_state.lock().unwrap() = state;
                std::thread::sleep(POLL);
            }
        });
        loop {
            let (state, rows_done) = chaos_state.lock().unwrap().clone().unzip();
            if state.as_deref() == Some("succeeded") {
                break;
            }
            assert!(
                !matches!(state.as_deref(), Some("failed" | "cancelled")),
                "chaos job ended {state:?}"
            );
            assert!(
                Instant::now() < deadline,
                "chaos run did not finish in time"
            );
            if let Some(&(at, what)) = planned.first()
                && rows_done.unwrap_or(0) as f64 >= at * m.rows as f64
            {
                planned.remove(0);
                eprintln!(
                    "  {:>6.1} s: restart {what}",
                    started.elapsed().as_secs_f64()
                );
                match what {
                    "coordinator" => {
                        coordinator.restart(Duration::from_millis(500));
                        coordinator_restarts += 1;
                    }
                    _ => {
                        rt.block_on(pg.crash_restart()).expect("postgres crash");
                        pg_restarts += 1;
                    }
                }
                continue;
            }
            std::thread::sleep(every.mul_f64(rng.random_range(0.6..1.4)));
            if kills + terms >= budget {
                continue;
            }
            // A victim that has lived long enough to hold a shard and be past its first batches.
            let ripe: Vec<usize> = (0..workers.len())
                .filter(|&i| workers[i].1.elapsed() > Duration::from_millis(1500))
                .collect();
            if ripe.is_empty() {
                continue;
            }
            let victim = ripe[rng.random_range(0..ripe.len())];
            let (mut w, _) = workers.remove(victim);
            // Every TERM_EVERY-th event is a SIGTERM, the others SIGKILLs: a fixed share, so
            // that the count of kills does not depend on the draw.
            if (kills + terms + 1) % TERM_EVERY == 0 {
                w.child.signal("TERM");
                let asked = Instant::now();
                let exited = w.child.wait_for(Duration::from_secs(40));
                eprintln!(
                    "  {:>6.1} s: SIGTERM drained in {:.1} s",
                    started.elapsed().as_secs_f64(),
                    asked.elapsed().as_secs_f64()
                );
                assert!(
                    exited.is_some_and(|s| s.success()),
                    "SIGTERM: worker did not drain and exit 0: {}",
                    w.log_text()
                );
                terms += 1;
            } else {
                w.child.kill();
                kills += 1;
                eprintln!(
                    "  {:>6.1} s: SIGKILL {}",
                    started.elapsed().as_secs_f64(),
                    w.id
                );
            }
            logs.push(w.log.clone());
            workers.push((
                start_worker(next_name(), &coordinator.url()),
                Instant::now(),
            ));
        }
    });
    let took = started.elapsed();
    for (w, _) in &mut workers {
        w.child.signal("TERM");
    }
    for (w, _) in &mut workers {
        let _ = w.child.wait_for(Duration::from_secs(40));
        logs.push(w.log.clone());
    }
    let inferred = rows_inferred(&logs);
    let stats = proxy.stats();
    eprintln!(
        "chaos: {kills} SIGKILLs, {terms} SIGTERMs, {coordinator_restarts} coordinator restarts, {pg_restarts} PostgreSQL restarts; \
         {} object store faults in {} requests; rows {} inferred {inferred} (recomputed {}); took {:.1} s vs {:.1} s undisturbed (slowdown {:.2}x)",
        stats.total_faults(),
        stats.requests,
        m.rows,
        inferred.saturating_sub(m.rows),
        took.as_secs_f64(),
        calm_took.as_secs_f64(),
        took.as_secs_f64() / calm_took.as_secs_f64()
    );
    assert!(
        kills >= m.min_kills,
        "only {kills} kills: the job finished too fast to count"
    );
    assert_eq!((coordinator_restarts, pg_restarts), (2, 1));
    let direct: Vec<(&str, String)> = env_for(&s3.endpoint());
    let input = format!("{}/*.parquet", data.display());
    verify_output_with(&direct, "s3://lake/out/chaos", &input, &model, 3000, &[]).assert_exact(&[]);
    verify_output_with(&direct, "s3://lake/out/calm", &input, &model, 500, &[]).assert_exact(&[]);
}
