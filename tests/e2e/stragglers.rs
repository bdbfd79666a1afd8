//! Speculative execution of stragglers (issue 15, item 3): one of four workers is slowed (a
//! delay before every model call, the `model-run-delay` failpoint). The job ends within 1.5x
//! of its time on the three others alone, because the straggler's shards are copied to idle
//! workers in the job's tail and the copies win; every row is in the output exactly once.

use std::path::Path;
use std::time::{Duration, Instant};

use nightshift_proto::wire::Manifest;
use nightshift_tests::cluster::{CoordinatorProc, SUBMIT_TOKEN, WorkerProc};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{nightshift, output_text, run};
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
const ROWS: u64 = 48_000;
/// Shards of 500 rows, model calls of 100: a slowed worker takes 10 s a shard.
const JOB: &str = "[batch]\nsize = 100\n[shards]\nrows = 500\ncheckpoint_rows = 250\n";
const SLOW: &str = "model-run-delay=sleep(2000)";
/// The fast workers take a little time per model call too, so that the job lasts long enough
/// for its tail to be measured against.
const FAST: &str = "model-run-delay=sleep(20)";
/// How much longer than the job on the fast workers alone the job with a straggler may take.
const MAX_RATIO: f64 = 1.5;

/// Submits a spec and waits for its job to end; answers how long that took.
fn run_job(f: &Fixture, c: &CoordinatorProc, spec: &Path) -> Duration {
    let started = Instant::now();
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path()).args([
        "submit",
        spec.to_str().unwrap(),
        "--coordinator",
        &c.url(),
        "--token",
        SUBMIT_TOKEN,
        "--wait",
    ]);
    let out = run(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{}\n{}",
        output_text(&out),
        std::fs::read_to_string(&c.log).unwrap_or_default()
    );
    started.elapsed()
}

fn metric(c: &CoordinatorProc, name: &str) -> f64 {
    let url = format!("{}/metrics", c.url());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let text = rt
        .block_on(async {
            let client = reqwest::Client::new();
            let asked = client
                .get(&url)
                .bearer_auth(SUBMIT_TOKEN)
                .send()
                .await
                .ok()?;
            asked.text().await.ok()
        })
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_slow_worker_s_shards_are_copied_and_the_job_ends_in_time() {
    let f = Fixture::new();
    let rows = ROWS.to_string();
    let data = f.data(
        "in",
        &[
            "--rows",
            &rows,
            "--files",
            "4",
            "--row-group-rows",
            "250",
            "--dim",
            "8",
        ],
    );
    let model = f.model("m.onnx", &["--dim", "8", "--hidden", "16"]);
    let input = format!("{}/*.parquet", data.display());
    let spec = |name: &str| {
        let out = f.path(name);
        let toml = spec_toml(name, &input, &model, &out, JOB);
        (f.spec(&format!("{name}.toml"), &toml), out)
    };
    let db = format!("sqlite://{}", f.path("state/nightshift.db").display());
    let c = CoordinatorProc::start(
        Path::new(BIN),
        f.dir.path(),
        "coordinator",
        &db,
        &["--allow-uri", &f.allow_uri(), "--speculate-slowness", "2"],
        &[("RUST_LOG".into(), "info".into())],
    );
    let start = |id: &str, envs: &[(String, String)]| {
        WorkerProc::start(
            Path::new(BIN),
            f.dir.path(),
            id,
            &c.url(),
            &["--slots", "1"],
            envs,
        )
    };
    let mut workers: Vec<WorkerProc> = ["fast-1", "fast-2", "fast-3"]
        .iter()
        .map(|id| start(id, &[("FAILPOINTS".into(), FAST.into())]))
        .collect();

    let (alone, _) = spec("alone");
    let fast = run_job(&f, &c, &alone);

    workers.push(start("slow", &[("FAILPOINTS".into(), SLOW.into())]));
    // The slow worker is up before the job is submitted, so it takes shards from the start.
    std::thread::sleep(Duration::from_secs(1));
    let (straggled, out) = spec("straggled");
    let with_straggler = run_job(&f, &c, &straggled);

    let ratio = with_straggler.as_secs_f64() / fast.as_secs_f64();
    eprintln!("fast workers alone: {fast:?}; with a straggler: {with_straggler:?} ({ratio:.2}x)");
    let logs = || {
        let coordinator = std::fs::read_to_string(&c.log).unwrap_or_default();
        let workers: Vec<String> = workers.iter().map(|w| w.log_text()).collect();
        format!("{coordinator}\n{}", workers.join("\n"))
    };
    assert!(
        metric(&c, "nightshift_speculative_copies_started_total") >= 1.0,
        "no copy was made\n{}",
        logs()
    );
    assert!(metric(&c, "nightshift_speculative_copies_won_total") >= 1.0);
    assert!(ratio <= MAX_RATIO, "{ratio:.2}x\n{}", logs());
    verify_output(out.to_str().unwrap(), &input, &model, 0, &[]).assert_exact(&[]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!((manifest.total_rows, manifest.input_rows), (ROWS, ROWS));
}
