//! Jobs on an S3-compatible store (the local moto server): s3:// input, model and output;
//! faults between nightshift and the store; a crash mid-commit; garbage collection; an input
//! that changes mid-job; missing buckets and keys; output file sizes.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nightshift_tests::cluster::paced;
use nightshift_tests::fault_proxy::{FaultPlan, FaultProxy};
use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{ChildGuard, nightshift, run};
use nightshift_tests::s3::S3Server;
use nightshift_tests::verify::{Verified, verify_output_with};

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

struct Setup {
    f: Fixture,
    rt: tokio::runtime::Runtime,
    s3: S3Server,
    local_data: PathBuf,
    local_model: PathBuf,
}

/// A moto server with bucket `lake`: the generated input under `s3://lake/in/`, the model at
/// `s3://lake/models/m.onnx`.
fn setup(data_args: &[&str], model_args: &[&str]) -> Setup {
    let f = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = rt.block_on(S3Server::start()).expect("moto");
    rt.block_on(s3.create_bucket("lake")).unwrap();
    let local_data = f.data("in", data_args);
    let local_model = f.model("m.onnx", model_args);
    rt.block_on(s3.upload_dir(&local_data, "s3://lake/in/"))
        .unwrap();
    rt.block_on(s3.put(
        "s3://lake/models/m.onnx",
        std::fs::read(&local_model).unwrap(),
    ))
    .unwrap();
    Setup {
        f,
        rt,
        s3,
        local_data,
        local_model,
    }
}

impl Setup {
    fn envs(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        nightshift_tests::s3::env_for(endpoint)
    }

    fn spec(&self, name: &str, out: &str, extra: &str) -> PathBuf {
        let toml = spec_toml(
            name,
            "s3://lake/in/*.parquet",
            Path::new("s3://lake/models/m.onnx"),
            Path::new(out),
            extra,
        );
        self.f.spec(&format!("{name}.toml"), &toml)
    }

    fn command(&self, spec: &Path, endpoint: &str, state: &str) -> std::process::Command {
        let mut cmd = nightshift(Path::new(BIN));
        cmd.current_dir(self.f.dir.path())
            .arg("run")
            .arg(spec)
            .arg("--state")
            .arg(self.f.path(state));
        for (k, v) in self.envs(endpoint) {
            cmd.env(k, v);
        }
        cmd
    }

    fn run(&self, spec: &Path, endpoint: &str, state: &str, env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(spec, endpoint, state);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, Duration::from_secs(300))
    }

    fn verify(&self, out: &str, sample: usize) -> Verified {
        let envs: Vec<(&str, String)> = self.envs(&self.s3.endpoint());
        let input = format!("{}/*.parquet", self.local_data.display());
        verify_output_with(&envs, out, &input, &self.local_model, sample, &[])
    }

    fn list(&self, prefix: &str) -> Vec<String> {
        self.rt.block_on(self.s3.list(prefix)).unwrap()
    }

    fn manifest(&self, out: &str) -> serde_json::Value {
        let bytes = self
            .rt
            .block_on(self.s3.get(&format!("{out}/_manifest.json")))
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn s3_input_to_s3_output_is_exact_and_the_model_is_fetched_once() {
    let s = setup(
        &[
            "--rows",
            "12000",
            "--files",
            "3",
            "--row-group-rows",
            "1000",
            "--codecs",
            "zstd,snappy,gzip",
        ],
        &["--hidden", "64"],
    );
    let spec = s.spec(
        "s3job",
        "s3://lake/out/s3job/",
        "[batch]\nsize = 500\n[shards]\nrows = 2000\ncheckpoint_rows = 1000\n",
    );
    let o = s.run(
        &spec,
        &s.s3.endpoint(),
        "state",
        &[("RUST_LOG", "warn,nightshift_worker=info")],
    );
    assert!(o.status.success(), "{}", text(&o));
    s.verify("s3://lake/out/s3job", 0).assert_exact(&[]);
    let manifest = s.manifest("s3://lake/out/s3job");
    assert_eq!(manifest["input_snapshot"].as_array().unwrap().len(), 3);
    assert!(
        manifest["input_snapshot"][0]["etag"].is_string(),
        "the snapshot records ETags: {manifest}"
    );
    assert!(manifest["files"][0]["bytes"].as_u64().unwrap() > 0);
    // Six shards, one download of the model (then the cache, keyed by its ETag).
    let fetched = text(&o).matches("model fetched into cache").count();
    assert_eq!(fetched, 1, "{}", text(&o));
    assert!(
        s.list("s3://lake/out/s3job/_parts/").is_empty(),
        "parts are deleted after commit"
    );
}

#[test]
fn faults_between_nightshift_and_the_store_do_not_change_the_output() {
    let s = setup(
        &[
            "--rows",
            "12000",
            "--files",
            "3",
            "--row-group-rows",
            "1000",
        ],
        &["--hidden", "64"],
    );
    let proxy = FaultProxy::start(s.s3.addr(), FaultPlan::new(42, 0.08)).expect("proxy");
    let spec = s.spec(
        "faulty",
        "s3://lake/out/faulty/",
        "[batch]\nsize = 500\n[shards]\nrows = 2000\ncheckpoint_rows = 1000\n",
    );
    let o = s.run(&spec, &proxy.endpoint(), "state", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let stats = proxy.stats();
    eprintln!("fault proxy: {stats:?}");
    assert!(
        stats.total_faults() as f64 >= 0.05 * stats.requests as f64 && stats.total_faults() >= 5,
        "{stats:?}"
    );
    s.verify("s3://lake/out/faulty", 2000).assert_exact(&[]);
}

#[test]
fn a_crash_mid_commit_commits_once_on_the_next_run() {
    let s = setup(
        &["--rows", "6000", "--files", "2", "--row-group-rows", "500"],
        &["--hidden", "32"],
    );
    let out = "s3://lake/out/crash";
    let spec = s.spec(
        "crash",
        &format!("{out}/"),
        "[shards]\nrows = 1000\ncheckpoint_rows = 500\n",
    );
    let spec_text = std::fs::read_to_string(&spec).unwrap().replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\"]\ntarget_file_mb = 1",
    );
    std::fs::write(&spec, spec_text).unwrap();
    // Crash after the output files, before the manifest.
    let o = s.run(
        &spec,
        &s.s3.endpoint(),
        "state",
        &[("FAILPOINTS", "finalize-before-manifest=return")],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let files_before: Vec<String> = s
        .list(&format!("{out}/"))
        .into_iter()
        .filter(|k| !k.contains("/_parts/"))
        .collect();
    assert!(
        !files_before.is_empty() && !files_before.iter().any(|k| k.ends_with("_manifest.json")),
        "{files_before:?}"
    );
    // Crash again after the manifest, before _SUCCESS.
    let o = s.run(
        &spec,
        &s.s3.endpoint(),
        "state",
        &[("FAILPOINTS", "finalize-before-success=return")],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let manifest_first =
        s.rt.block_on(s.s3.get(&format!("{out}/_manifest.json")))
            .unwrap();
    let o = s.run(&spec, &s.s3.endpoint(), "state", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let manifest_last =
        s.rt.block_on(s.s3.get(&format!("{out}/_manifest.json")))
            .unwrap();
    assert_eq!(
        manifest_first, manifest_last,
        "the second commit wrote another manifest"
    );
    let files_after: Vec<String> = s
        .list(&format!("{out}/"))
        .into_iter()
        .filter(|k| !k.contains("/_parts/") && !k.starts_with(&format!("{out}/_")))
        .collect();
    let files_before: Vec<String> = files_before
        .into_iter()
        .filter(|k| !k.starts_with(&format!("{out}/_")))
        .collect();
    assert_eq!(
        files_before, files_after,
        "commit is idempotent: the same files"
    );
    s.verify(out, 500).assert_exact(&[]);
    assert!(s.list(&format!("{out}/_parts/")).is_empty());
}

#[test]
fn orphan_parts_of_a_killed_run_are_removed_and_files_meet_the_size_rule() {
    let s = setup(
        &[
            "--rows",
            "30000",
            "--files",
            "2",
            "--row-group-rows",
            "1000",
        ],
        &["--hidden", "256"],
    );
    let out = "s3://lake/out/orphans";
    let spec = s.spec(
        "orphans",
        &format!("{out}/"),
        "[batch]\nsize = 500\n[shards]\nrows = 3000\ncheckpoint_rows = 1000\n",
    );
    let text_spec = std::fs::read_to_string(&spec).unwrap().replace(
        "passthrough = [\"id\"]",
        "passthrough = [\"id\", \"group\"]\ntarget_file_mb = 1",
    );
    std::fs::write(&spec, text_spec).unwrap();
    let mut cmd = s.command(&spec, &s.s3.endpoint(), "state");
    // At most 5,000 rows/s (100 ms a 500-row batch): the sixth part comes about 1.2 s in,
    // and the job lasts 6 s, whatever the load.
    let (key, value) = paced(100);
    cmd.env(key, value);
    let mut child = ChildGuard::spawn_logged(cmd, &s.f.path("run.log"));
    // Kill it while parts exist that no checkpoint recorded yet (uploads in flight count).
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.list(&format!("{out}/_parts/")).len() < 6 {
        assert!(
            child.try_wait().is_none(),
            "{}",
            std::fs::read_to_string(s.f.path("run.log")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill();
    // Plant an orphan as a fenced-off writer would leave one.
    let parts = s.list(&format!("{out}/_parts/"));
    let prefix = parts[0].rsplit_once('/').unwrap().0.to_string();
    s.rt.block_on(s.s3.put(&format!("{prefix}/s1-t999-r0.parquet"), b"garbage".to_vec()))
        .unwrap();
    let o = s.run(&spec, &s.s3.endpoint(), "state", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        s.list(&format!("{out}/_parts/")).is_empty(),
        "orphans left: {:?}",
        s.list(&format!("{out}/_parts/"))
    );
    s.verify(out, 1000).assert_exact(&[]);
    let manifest = s.manifest(out);
    let sizes: Vec<u64> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["bytes"].as_u64().unwrap())
        .collect();
    let half = 512 * 1024;
    assert!(sizes.len() > 1, "{sizes:?}");
    assert!(
        sizes.iter().filter(|b| **b < half).count() <= 1,
        "more than one file under half the target: {sizes:?}"
    );
}

#[test]
fn an_input_that_changes_mid_job_fails_the_shards_that_read_it() {
    let s = setup(
        &[
            "--rows",
            "24000",
            "--files",
            "2",
            "--row-group-rows",
            "2000",
        ],
        &["--hidden", "256"],
    );
    let out = "s3://lake/out/changed";
    let spec = s.spec(
        "changed",
        &format!("{out}/"),
        "[batch]\nsize = 500\n[shards]\nrows = 4000\ncheckpoint_rows = 2000\n",
    );
    // The other content is made before the run starts, so that it replaces the file within
    // moments of the first part (made after it, it once came too late: the job had read the
    // second file and succeeded).
    let other = s.f.data(
        "other",
        &[
            "--rows",
            "12000",
            "--files",
            "1",
            "--row-group-rows",
            "2000",
            "--seed",
            "99",
        ],
    );
    let mut cmd = s.command(&spec, &s.s3.endpoint(), "state");
    // At most 3,333 rows/s (150 ms a 500-row batch), whatever the load: the second file is
    // first read seconds after the first part. Unpaced, a job 4,096 wide ran in 1.2 s once.
    let (key, value) = paced(150);
    cmd.env(key, value);
    let mut child = ChildGuard::spawn_logged(cmd, &s.f.path("run.log"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.list(&format!("{out}/_parts/")).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Replace the second file (not yet read: shards go in order) with other content.
    s.rt.block_on(s.s3.put(
        "s3://lake/in/part-001.parquet",
        std::fs::read(other.join("part-000.parquet")).unwrap(),
    ))
    .unwrap();
    let status = child.wait_for(Duration::from_secs(300)).expect("run ends");
    let log = std::fs::read_to_string(s.f.path("run.log")).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("s3://lake/in/part-001.parquet")
            && log.contains("changed since the job was planned"),
        "{log}"
    );
    assert!(s.list(&format!("{out}/_SUCCESS")).is_empty());
}

#[test]
fn missing_buckets_and_keys_are_refused_naming_the_uri() {
    let s = setup(&["--rows", "1000", "--files", "1"], &["--hidden", "16"]);
    let cases = [
        (
            "s3://nobucket/in/*.parquet",
            "s3://lake/models/m.onnx",
            "s3://lake/out/x/",
            "nobucket",
        ),
        (
            "s3://lake/in/*.parquet",
            "s3://lake/models/missing.onnx",
            "s3://lake/out/x/",
            "s3://lake/models/missing.onnx",
        ),
        (
            "s3://lake/in/nothere.parquet",
            "s3://lake/models/m.onnx",
            "s3://lake/out/x/",
            "s3://lake/in/nothere.parquet",
        ),
        (
            "s3://lake/in/*.parquet",
            "s3://lake/models/m.onnx",
            "s3://nobucket-out/x/",
            "nobucket-out",
        ),
    ];
    for (i, (input, model, out, needle)) in cases.iter().enumerate() {
        let toml = spec_toml(
            &format!("missing{i}"),
            input,
            Path::new(model),
            Path::new(out),
            "",
        );
        let spec = s.f.spec(&format!("missing{i}.toml"), &toml);
        let started = Instant::now();
        let o = s.run(&spec, &s.s3.endpoint(), &format!("state{i}"), &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "`{needle}` not in: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "permanent errors fail fast: {:?}",
            started.elapsed()
        );
        eprintln!("{err}");
    }
}
