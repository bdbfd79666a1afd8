//! Real processes: the `nightshift` binary run to completion with a deadline, or started in
//! the background and killed (for real) when the test says so or when it ends.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::python::ort_library;

/// A `nightshift` command with ONNX Runtime found and quiet logs.
pub fn nightshift(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    c.env("ORT_DYLIB_PATH", ort_library())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("AWS_PROFILE");
    c
}

/// Runs to completion; kills it and panics past `limit`.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let guard = ChildGuard::new(child);
    guard.wait_output(limit)
}

/// Linux's default CPU scheduling policy (sched(7)).
pub const SCHED_OTHER: u32 = 0;
/// Linux's policy for throughput work, which does not preempt on wakeup (sched(7)).
pub const SCHED_BATCH: u32 = 3;

/// Kills its process when dropped, so no test leaves one behind.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    /// Starts `cmd` with its output going to `log`.
    pub fn spawn_logged(mut cmd: Command, log: &Path) -> Self {
        let f = std::fs::File::create(log).expect("log file");
        let f2 = f.try_clone().expect("log file");
        cmd.stdout(Stdio::from(f)).stderr(Stdio::from(f2));
        Self::new(cmd.spawn().expect("spawn"))
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The process's CPU scheduling policy (`SCHED_OTHER` 0, `SCHED_BATCH` 3, ...: sched(7)),
    /// field 41 of `/proc/PID/stat`.
    pub fn sched_policy(&self) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id())).ok()?;
        // The fields after the command name (which may hold spaces) start at field 3.
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(41 - 3)?.parse().ok()
    }

    /// SIGKILL, no warning.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.child = None;
    }

    /// Sends a signal (SIGTERM, SIGINT) without waiting; nothing once the process is gone
    /// (`kill` of pid 0 would signal the test's own process group).
    pub fn signal(&self, sig: &str) {
        if self.child.is_none() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.id().to_string())
            .status();
    }

    /// Whether the process is still running (false once killed or waited for).
    pub fn running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for exit up to `limit`; None if still running (then it is left running).
    pub fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn wait_output(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("child");
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let read = |r: Option<std::process::ChildStdout>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = std::io::Read::read_to_end(&mut r, &mut buf);
                }
                buf
            })
        };
        let out_t = read(stdout);
        let err_t = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = stderr {
                let _ = std::io::Read::read_to_end(&mut r, &mut buf);
            }
            buf
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("process ran past {limit:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A finished command's stdout and stderr, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
