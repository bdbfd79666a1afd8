//! `nightshift run` end to end, as a user runs it: real processes, real files, real ONNX
//! Runtime, killed for real. Output is checked by an independent verifier.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::paced;
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{ChildGuard, nightshift, run};
use nightshift_tests::python::run_script;
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

/// `nightshift run SPEC` with the fixture's state directory.
fn run_command(f: &Fixture, spec: &Path) -> std::process::Command {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(spec)
        .arg("--state")
        .arg(f.path("state"));
    cmd
}

fn run_job(f: &Fixture, spec: &Path, extra: &[&str]) -> Output {
    let mut cmd = run_command(f, spec);
    cmd.args(extra);
    run(cmd, Duration::from_secs(300))
}

/// `run_job` stopped for real at the crash point `failpoint`: it must fail.
fn crash_at(f: &Fixture, spec: &Path, failpoint: &str) -> Output {
    let mut cmd = run_command(f, spec);
    cmd.env("FAILPOINTS", format!("{failpoint}=return"));
    let o = run(cmd, Duration::from_secs(300));
    assert!(!o.status.success(), "{}", text(&o));
    o
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Shards of the job in the local state, as (id, state, token, checkpoint_rows).
fn shards(state: &Path) -> Vec<(i64, String, i64, i64)> {
    let db = state.join("nightshift.db");
    let out = run_script(
        "query_sqlite.py",
        &[
            db.to_str().unwrap(),
            "SELECT id, state, token, checkpoint_rows FROM shards WHERE kind = 'rows' ORDER BY id",
        ],
    );
    serde_json::from_str::<Vec<(i64, String, i64, i64)>>(out.trim()).unwrap_or_default()
}

/// Whether the run has created its state database and its tables (the file appears before
/// the migrations have run).
fn has_shards_table(state: &Path) -> bool {
    let db = state.join("nightshift.db");
    db.exists()
        && run_script(
            "query_sqlite.py",
            &[
                db.to_str().unwrap(),
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'shards'",
            ],
        )
        .contains("shards")
}

#[test]
fn multi_file_multi_row_group_job_is_exact() {
    let f = Fixture::new();
    let data = f.data(
        "in",
        &[
            "--rows",
            "24000",
            "--files",
            "3",
            "--row-group-rows",
            "1500",
            "--codecs",
            "snappy,zstd,gzip",
        ],
    );
    let model = f.model("m.onnx", &["--hidden", "64"]);
    let out = f.path("out");
    let mut toml = spec_toml(
        "exact",
        &format!("{}/*.parquet", data.display()),
        &model,
        &out,
        "[batch]\nsize = 500\n\n[shards]\nrows = 4000\ncheckpoint_rows = 1500\n",
    );
    toml = toml.replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\", \"group\"]",
    );
    let spec = f.spec("job.toml", &toml);
    let o = run_job(&f, &spec, &["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).expect("one JSON line");
    assert_eq!(line["job"], "exact");
    assert_eq!(line["state"], "succeeded");
    assert_eq!(line["rows"], 24000);
    assert!(line["seconds"].as_f64().unwrap() > 0.0);
    assert!(line["rows_per_s"].as_f64().unwrap() > 0.0);
    // Six shards across three files with eight row groups each, and the output made by one
    // merge (the output is far under `target_file_mb`): one file, written by a worker.
    assert_eq!(shards(&f.path("state")).len(), 6);
    let db = f.path("state").join("nightshift.db");
    let merges = run_script(
        "query_sqlite.py",
        &[
            db.to_str().unwrap(),
            "SELECT COUNT(*) FROM shards WHERE kind = 'merge' AND state = 'done'",
        ],
    );
    assert_eq!(merges.trim(), "[[1]]", "{merges}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["files"].as_array().unwrap().len(), 1, "{manifest}");

    let v = verify_output(
        out.to_str().unwrap(),
        &format!("{}/*.parquet", data.display()),
        &model,
        0,
        &["--passthrough", "id,group"],
    );
    v.assert_exact(&[]);
    assert_eq!(v.rows_checked_against_model, 24000);
    assert!(out.join("_SUCCESS").exists());
    assert!(
        !out.join("_parts").exists(),
        "parts are collected after commit"
    );

    let readers: serde_json::Value =
        serde_json::from_str(run_script("check_readers.py", &[out.to_str().unwrap()]).trim())
            .unwrap();
    for r in ["pyarrow", "duckdb", "polars"] {
        assert_eq!(readers[r], 24000, "{r}: {readers}");
    }
    assert_eq!(readers["duckdb_distinct_ids"], 24000);
}

#[test]
fn rerun_reports_done_and_a_changed_spec_needs_restart() {
    let f = Fixture::new();
    let data = f.data(
        "in",
        &["--rows", "3000", "--files", "1", "--row-group-rows", "1000"],
    );
    let model = f.model("m.onnx", &["--hidden", "32"]);
    let out = f.path("out");
    let input = format!("{}/*.parquet", data.display());
    // Written through a link and a `..`: the job keeps the path as it leads, and a rerun
    // still finds it the same spec.
    std::os::unix::fs::symlink(&data, f.path("linked")).unwrap();
    let written = format!("{}/../linked/*.parquet", data.display());
    let toml = spec_toml("again", &written, &model, &out, "[batch]\nsize = 256\n");
    let spec = f.spec("job.toml", &toml);
    assert!(run_job(&f, &spec, &[]).status.success());

    let again = run_job(&f, &spec, &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("already succeeded"),
        "{}",
        text(&again)
    );

    let changed = f.spec("job.toml", &toml.replace("size = 256", "size = 128"));
    let refused = run_job(&f, &changed, &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("different spec") && text(&refused).contains("--restart"),
        "{}",
        text(&refused)
    );

    let restarted = run_job(&f, &changed, &["--restart", "--json"]);
    assert!(restarted.status.success(), "{}", text(&restarted));
    verify_output(out.to_str().unwrap(), &input, &model, 0, &[]).assert_exact(&[]);
}

/// Starts a slow job in the background and waits until `ready` holds for its shards.
fn start_and_wait(
    f: &Fixture,
    spec: &Path,
    ready: impl Fn(&[(i64, String, i64, i64)]) -> bool,
) -> ChildGuard {
    // At most 8,333 rows/s (60 ms a 500-row batch), whatever the machine's load: a 12,000-row
    // shard lasts over a second.
    start_paced(f, spec, 60, ready)
}

/// As `start_and_wait`, each model call taking `pace_ms`.
fn start_paced(
    f: &Fixture,
    spec: &Path,
    pace_ms: u64,
    ready: impl Fn(&[(i64, String, i64, i64)]) -> bool,
) -> ChildGuard {
    let mut cmd = nightshift(Path::new(BIN));
    let (key, value) = paced(pace_ms);
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(spec)
        .arg("--state")
        .arg(f.path("state"))
        .env(key, value);
    let mut child = ChildGuard::spawn_logged(cmd, &f.path("run.log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait() {
            panic!(
                "run ended early ({status}): {}",
                std::fs::read_to_string(f.path("run.log")).unwrap_or_default()
            );
        }
        if has_shards_table(&f.path("state")) && ready(&shards(&f.path("state"))) {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "job did not reach the wanted point in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn slow_job(f: &Fixture) -> (PathBuf, PathBuf, String, PathBuf) {
    // Run paced by `start_and_wait`, so that it takes seconds and can be stopped in the middle.
    let job = f.job(
        "slow",
        &[
            "--rows",
            "96000",
            "--files",
            "2",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "256"],
        "[batch]\nsize = 500\n\n[shards]\nrows = 12000\ncheckpoint_rows = 2000\n",
    );
    (job.spec, job.model, job.input, job.out)
}

#[test]
fn sigkill_mid_job_then_rerun_is_exact_and_recomputes_no_done_shard() {
    let f = Fixture::new();
    let (spec, model, input, out) = slow_job(&f);
    let mut child = start_and_wait(&f, &spec, |s| {
        let done = s.iter().filter(|x| x.1 == "done").count();
        // At most half done, so the shard is still partial when the kill lands.
        let partial = s.iter().any(|x| x.1 == "leased" && x.3 > 0 && x.3 <= 6000);
        done >= 2 && partial
    });
    child.kill();
    let before = shards(&f.path("state"));
    let done_before: Vec<_> = before.iter().filter(|s| s.1 == "done").cloned().collect();
    let partial: Vec<_> = before
        .iter()
        .filter(|s| s.1 == "leased" && s.3 > 0)
        .cloned()
        .collect();
    assert!(!done_before.is_empty() && !partial.is_empty());

    let o = run_job(&f, &spec, &["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let after = shards(&f.path("state"));
    for d in &done_before {
        let now = after.iter().find(|s| s.0 == d.0).unwrap();
        assert_eq!(
            now.2, d.2,
            "done shard {} was granted again (token {} -> {})",
            d.0, d.2, now.2
        );
    }
    // The interrupted shard resumed after its checkpoint: its first parts keep the old token.
    let parts = run_script(
        "query_sqlite.py",
        &[
            f.path("state/nightshift.db").to_str().unwrap(),
            "SELECT shard_id, token, row_start, rows FROM parts ORDER BY shard_id, row_start",
        ],
    );
    let parts: Vec<(i64, i64, i64, i64)> = serde_json::from_str(parts.trim()).unwrap();
    for p in &partial {
        let old: i64 = parts
            .iter()
            .filter(|x| x.0 == p.0 && x.1 == p.2)
            .map(|x| x.3)
            .sum();
        assert_eq!(
            old, p.3,
            "rows committed before the kill were recomputed for shard {}",
            p.0
        );
        let rows_in_parts: i64 = parts.iter().filter(|x| x.0 == p.0).map(|x| x.3).sum();
        assert_eq!(rows_in_parts, 12000);
    }
    verify_output(out.to_str().unwrap(), &input, &model, 1500, &[]).assert_exact(&[]);
}

#[test]
fn ctrl_c_drains_then_rerun_finishes() {
    let f = Fixture::new();
    let (spec, model, input, out) = slow_job(&f);
    let mut child = start_and_wait(&f, &spec, |s| s.iter().any(|x| x.1 == "done"));
    child.signal("INT");
    let status = child
        .wait_for(Duration::from_secs(60))
        .expect("drained within a minute");
    assert_eq!(
        status.code(),
        Some(130),
        "{}",
        std::fs::read_to_string(f.path("run.log")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(f.path("run.log")).unwrap_or_default();
    assert!(
        log.contains("Run the same command again to resume"),
        "{log}"
    );
    let after = shards(&f.path("state"));
    assert!(
        after.iter().all(|s| s.1 != "leased"),
        "drained shards are released: {after:?}"
    );
    assert!(!out.join("_SUCCESS").exists());

    let o = run_job(&f, &spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    verify_output(out.to_str().unwrap(), &input, &model, 1500, &[]).assert_exact(&[]);
}

/// A second Ctrl-C stops at once instead of waiting for the drain; what was held resumes from
/// its checkpoints on the next run, exactly once.
#[test]
fn a_second_ctrl_c_stops_without_waiting_for_the_drain() {
    const BATCH_MS: u64 = 10_000;
    let f = Fixture::new();
    let (spec, model, input, out) = slow_job(&f);
    let mut child = start_paced(&f, &spec, BATCH_MS, |s| s.iter().any(|x| x.1 == "leased"));
    // A batch is in flight: the drain would wait for it.
    std::thread::sleep(Duration::from_millis(500));
    child.signal("INT");
    std::thread::sleep(Duration::from_millis(300));
    child.signal("INT");
    let stopped = Instant::now();
    let status = child
        .wait_for(Duration::from_secs(60))
        .expect("stopped within a minute");
    let log = std::fs::read_to_string(f.path("run.log")).unwrap_or_default();
    assert!(
        stopped.elapsed() < Duration::from_millis(BATCH_MS / 2),
        "waited {:?} for the drain: {log}",
        stopped.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("stopping without draining"), "{log}");
    let o = run_job(&f, &spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    verify_output(out.to_str().unwrap(), &input, &model, 1500, &[]).assert_exact(&[]);
}

#[test]
fn reads_parquet_as_other_tools_write_it() {
    let f = Fixture::new();
    let root = f.path("in");
    f.data(
        "in/pyarrow",
        &[
            "--rows",
            "3000",
            "--files",
            "3",
            "--row-group-rows",
            "700",
            "--codecs",
            "lz4,brotli,none",
            "--list-type",
            "list",
            "--nullable",
            "--dictionary",
            "--seed",
            "1",
        ],
    );
    f.data(
        "in/large",
        &[
            "--rows",
            "2000",
            "--files",
            "1",
            "--row-group-rows",
            "900",
            "--list-type",
            "large",
            "--seed",
            "2",
            "--id-offset",
            "10000",
        ],
    );
    f.data(
        "in/duckdb",
        &[
            "--rows",
            "2500",
            "--files",
            "1",
            "--writer",
            "duckdb",
            "--seed",
            "3",
            "--id-offset",
            "20000",
        ],
    );
    f.data(
        "in/spark",
        &[
            "--rows",
            "2500",
            "--files",
            "2",
            "--row-group-rows",
            "800",
            "--writer",
            "spark",
            "--seed",
            "4",
            "--id-offset",
            "30000",
        ],
    );
    let model = f.model("m.onnx", &["--hidden", "32"]);
    let out = f.path("out");
    let input = format!("{}/**/*.parquet", root.display());
    let spec = f.spec(
        "job.toml",
        &spec_toml("writers", &input, &model, &out, "[shards]\nrows = 1000\n"),
    );
    let o = run_job(&f, &spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    verify_output(out.to_str().unwrap(), &input, &model, 0, &[]).assert_exact(&[]);
}

#[test]
fn a_file_already_at_an_output_name_is_never_adopted() {
    let f = Fixture::new();
    let job = f.job(
        "adopter",
        &["--rows", "2000", "--files", "1", "--row-group-rows", "500"],
        &["--hidden", "16"],
        "",
    );
    // Another file (here the input itself) sits where the first output file will go.
    let input = std::fs::read_dir(f.path("in"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::create_dir_all(&job.out).unwrap();
    let planted = job.out.join("part-00000.parquet");
    std::fs::copy(&input, &planted).unwrap();
    let before = std::fs::read(&planted).unwrap();
    let o = run_job(&f, &job.spec, &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("not this job's"), "{t}");
    assert!(t.contains("part-00000.parquet"), "{t}");
    assert_eq!(
        std::fs::read(&planted).unwrap(),
        before,
        "the file was changed"
    );
    assert!(!job.out.join("_manifest.json").exists());
    assert!(!job.out.join("_SUCCESS").exists());
}

#[test]
fn a_crash_mid_commit_publishes_each_file_once_on_the_next_run() {
    let f = Fixture::new();
    let job = f.job(
        "moved",
        &[
            "--rows",
            "24000",
            "--files",
            "2",
            "--row-group-rows",
            "1000",
        ],
        &["--hidden", "16"],
        "[shards]\nrows = 2000\ncheckpoint_rows = 1000\n",
    );
    let spec = std::fs::read_to_string(&job.spec).unwrap().replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\", \"features\"]\ntarget_file_mb = 1",
    );
    std::fs::write(&job.spec, spec).unwrap();
    crash_at(&f, &job.spec, "finalize-before-manifest");
    // The files were moved into place (their merged sources are gone), no manifest yet.
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let before: Vec<String> = listing(&job.out)
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    assert!(before.len() >= 2, "{before:?}");
    assert!(!job.out.join("_manifest.json").exists());
    let inodes = |names: &[String]| -> Vec<u64> {
        use std::os::unix::fs::MetadataExt;
        names
            .iter()
            .map(|n| std::fs::metadata(job.out.join(n)).unwrap().ino())
            .collect()
    };
    let inodes_before = inodes(&before);
    // The next run keeps what it published and commits.
    let o = run_job(&f, &job.spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let after: Vec<String> = listing(&job.out)
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    assert_eq!(before, after);
    assert_eq!(
        inodes_before,
        inodes(&after),
        "the same files, not rewritten"
    );
    assert!(!job.out.join("_parts").exists(), "{:?}", listing(&job.out));
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
}

/// A run that dies between recording its job's success and deleting its parts leaves them
/// marked as garbage: the next run of the job (which only reports it done) collects them.
#[test]
fn parts_a_crash_left_after_the_commit_are_collected_by_the_next_run() {
    let f = Fixture::new();
    let job = f.job(
        "collected",
        &["--rows", "4000", "--files", "1"],
        &["--hidden", "16"],
        "[shards]\nrows = 1000\n",
    );
    let o = crash_at(&f, &job.spec, "finalize-before-garbage");
    assert!(job.out.join("_SUCCESS").exists(), "{}", text(&o));
    assert!(job.out.join("_parts").exists(), "the crash left the parts");
    let o = run_job(&f, &job.spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already succeeded"), "{}", text(&o));
    assert!(
        !job.out.join("_parts").exists(),
        "the next run collected them"
    );
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
}

#[test]
fn float16_features_feed_a_float16_model_end_to_end() {
    let f = Fixture::new();
    let job = f.job(
        "half",
        &[
            "--rows", "4000", "--files", "1", "--dim", "8", "--dtype", "float16",
        ],
        &["--dtype", "float16", "--dim", "8", "--hidden", "64"],
        "",
    );
    let o = run_job(&f, &job.spec, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // Arrow Float16 in, the model's float16 out, each row equal to the model run on it alone.
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
}
