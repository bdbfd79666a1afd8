//! Poison rows: rows that cannot feed the model (a null, a wrong list length) or that the model
//! rejects are isolated to `_errors/` with their passthrough columns and the reason; every
//! other row is in the output exactly once; past the threshold the job fails with a summary.

use std::path::Path;
use std::time::Duration;

use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{nightshift, run};
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
const NULLS: &[i64] = &[17, 5_003, 11_999];
const SHORT: &[i64] = &[2_500, 9_001];
const REJECTED: &[i64] = &[0, 777, 8_191, 14_000, 15_999];

fn ids(v: &[i64]) -> String {
    v.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn job(
    f: &Fixture,
    max_rows: u64,
) -> (
    std::process::Output,
    String,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let data = f.data(
        "in",
        &[
            "--rows",
            "16000",
            "--files",
            "2",
            "--row-group-rows",
            "1000",
            "--list-type",
            "list",
            "--null-ids",
            &ids(NULLS),
            "--short-ids",
            &ids(SHORT),
            "--big-ids",
            &ids(REJECTED),
        ],
    );
    let model = f.model("m.onnx", &["--hidden", "32", "--reject-above", "100"]);
    let out = f.path("out");
    let input = format!("{}/*.parquet", data.display());
    let toml = spec_toml("poison", &input, &model, &out, &format!("[batch]\nsize = 512\n[shards]\nrows = 4000\ncheckpoint_rows = 2000\n[errors]\nmax_rows = {max_rows}\n"))
        .replace("passthrough = [\"id\"]", "passthrough = [\"id\", \"group\"]");
    let spec = f.spec("job.toml", &toml);
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(&spec)
        .arg("--state")
        .arg(f.path("state"));
    (run(cmd, Duration::from_secs(300)), input, model, out)
}

#[test]
fn poison_rows_go_to_errors_and_every_other_row_is_output_once() {
    let f = Fixture::new();
    let (o, input, model, out) = job(&f, 20);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let poison: Vec<i64> = NULLS.iter().chain(SHORT).chain(REJECTED).copied().collect();
    let v = verify_output(
        out.to_str().unwrap(),
        &input,
        &model,
        0,
        &["--passthrough", "id,group"],
    );
    v.assert_exact(&poison);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["error_rows"], poison.len());
    assert_eq!(
        manifest["total_rows"].as_u64().unwrap() + manifest["error_rows"].as_u64().unwrap(),
        manifest["input_rows"].as_u64().unwrap()
    );
    // Each error row names its class and reason, with its passthrough columns.
    let errors = nightshift_tests::python::run_script("read_errors.py", &[out.to_str().unwrap()]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(errors.trim()).unwrap();
    assert_eq!(rows.len(), poison.len());
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        let (class, needle) = if NULLS.contains(&id) {
            ("data", "is null")
        } else if SHORT.contains(&id) {
            ("data", "holds 31 values")
        } else {
            ("model", "")
        };
        assert_eq!(r["_error_class"], class, "{r}");
        assert!(r["_error"].as_str().unwrap().contains(needle), "{r}");
        assert_eq!(r["group"], format!("g{}", id % 7), "{r}");
        assert_eq!(
            r["_row"].as_i64().unwrap(),
            id % 8000,
            "row index within its file: {r}"
        );
    }
}

#[test]
fn past_the_threshold_the_job_fails_with_a_summary() {
    let f = Fixture::new();
    let (o, _, _, out) = job(&f, 3);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("poison rows") && err.contains("exceed the threshold of 3"),
        "{err}"
    );
    assert!(!out.join("_SUCCESS").exists());
}

#[test]
fn a_corrupt_page_fails_its_shard_at_once_and_names_the_file() {
    let f = Fixture::new();
    let data = f.data(
        "in",
        &[
            "--rows",
            "8000",
            "--files",
            "2",
            "--row-group-rows",
            "1000",
            "--codecs",
            "zstd",
        ],
    );
    let bad = data.join("part-001.parquet");
    nightshift_tests::python::run_script(
        "corrupt_page.py",
        &[bad.to_str().unwrap(), "features", "2"],
    );
    let model = f.model("m.onnx", &["--hidden", "16"]);
    let out = f.path("out");
    let input = format!("{}/*.parquet", data.display());
    let spec = f.spec(
        "job.toml",
        &spec_toml(
            "corrupt",
            &input,
            &model,
            &out,
            "[shards]\nrows = 2000\n[retry]\nmax_attempts = 5\n",
        ),
    );
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(&spec)
        .arg("--state")
        .arg(f.path("state"));
    let o = run(cmd, Duration::from_secs(300));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("corrupt Parquet data") && err.contains("part-001.parquet"),
        "{err}"
    );
    let db = f.path("state/nightshift.db");
    let dead = nightshift_tests::python::run_script(
        "query_sqlite.py",
        &[
            db.to_str().unwrap(),
            "SELECT attempts, error_class FROM shards WHERE state = 'dead'",
        ],
    );
    assert_eq!(
        dead.trim(),
        "[[1, \"permanent\"]]",
        "a permanent failure is not retried"
    );
    let done = nightshift_tests::python::run_script(
        "query_sqlite.py",
        &[
            db.to_str().unwrap(),
            "SELECT COUNT(*) FROM shards WHERE state = 'done' AND kind = 'rows'",
        ],
    );
    assert_eq!(done.trim(), "[[3]]", "the rest of the job went on");
    assert!(!out.join("_SUCCESS").exists());
}
