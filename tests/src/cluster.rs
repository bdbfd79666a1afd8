//! A cluster of real processes for end-to-end tests: coordinators and workers started from the
//! `nightshift` binary, each logging to a file, each killed when the handle drops.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, free_port, nightshift};

pub const SUBMIT_TOKEN: &str = "submit-secret-token";
pub const WORKER_TOKEN: &str = "worker-secret-token";

/// A coordinator process.
pub struct CoordinatorProc {
    pub port: u16,
    pub log: PathBuf,
    pub child: ChildGuard,
    args: Vec<String>,
    bin: PathBuf,
    envs: Vec<(String, String)>,
    restarts: u32,
}

impl CoordinatorProc {
    /// Starts `nightshift coordinator` on a free port and waits for /healthz.
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        database_url: &str,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Self {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--database-url".into(),
            database_url.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--submit-token".into(),
            SUBMIT_TOKEN.into(),
            "--worker-token".into(),
            WORKER_TOKEN.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.join(format!("{name}.log"));
        let child = spawn(bin, &args, &log, envs);
        let c = Self {
            port,
            log,
            child,
            args,
            bin: bin.to_path_buf(),
            envs: envs.to_vec(),
            restarts: 0,
        };
        c.wait_healthy();
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until /readyz answers 200.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if http_get_status(self.port, "/readyz") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "coordinator on {} not ready: {}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Kills it (SIGKILL) and starts it again on the same port, appending to the same log.
    pub fn restart(&mut self, pause: Duration) {
        self.child.kill();
        std::thread::sleep(pause);
        self.restarts += 1;
        let log = self.log.with_extension(format!("{}.log", self.restarts));
        self.child = spawn(&self.bin, &self.args, &log, &self.envs);
        self.log = log;
        self.wait_healthy();
    }
}

/// A worker process.
pub struct WorkerProc {
    pub id: String,
    pub log: PathBuf,
    pub child: ChildGuard,
}

impl WorkerProc {
    pub fn start(
        bin: &Path,
        dir: &Path,
        id: &str,
        coordinator: &str,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Self {
        // An id may hold `/`; its files stay in `dir`.
        let file = id.replace('/', "_");
        let mut args: Vec<String> = vec![
            "worker".into(),
            "--coordinator".into(),
            coordinator.into(),
            "--token".into(),
            WORKER_TOKEN.into(),
            "--worker-id".into(),
            id.into(),
            "--cache-dir".into(),
            dir.join(format!("{file}-cache")).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = dir.join(format!("{file}.log"));
        let child = spawn(bin, &args, &log, envs);
        Self {
            id: id.into(),
            log,
            child,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn spawn(bin: &Path, args: &[String], log: &Path, envs: &[(String, String)]) -> ChildGuard {
    let mut cmd: Command = nightshift(bin);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    ChildGuard::spawn_logged(cmd, log)
}

/// `nightshift submit SPEC --coordinator URL AUTH... EXTRA...` from `dir`, where `auth` gives
/// the token (`--token T` or `--token-file F`).
pub fn submit(
    bin: &Path,
    dir: &Path,
    coordinator: &str,
    spec: &Path,
    auth: &[&str],
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = nightshift(bin);
    cmd.current_dir(dir)
        .arg("submit")
        .arg(spec)
        .args(["--coordinator", coordinator])
        .args(auth)
        .args(extra);
    crate::process::run(cmd, Duration::from_secs(300))
}

/// A plain HTTP GET's status code, or None when nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().ok()?,
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// Rows the workers ran through the model, summed from their `batch inferred` log lines
/// (workers started with RUST_LOG including `nightshift_worker=debug`).
pub fn rows_inferred(logs: &[PathBuf]) -> u64 {
    logs.iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap_or_default()
                .lines()
                .filter(|line| line.contains("batch inferred"))
                .filter_map(|line| {
                    line.split_whitespace()
                        .find_map(|kv| kv.strip_prefix("rows="))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .sum::<u64>()
        })
        .sum()
}

/// The environment that makes each model call of a worker (or of `nightshift run`) wait `ms`
/// first, through the `model-run-delay` failpoint: a known speed, whatever the machine's load,
/// for tests that must act while a job runs.
pub fn paced(ms: u64) -> (String, String) {
    (
        "FAILPOINTS".to_string(),
        format!("model-run-delay=sleep({ms})"),
    )
}
