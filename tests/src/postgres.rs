//! A throwaway PostgreSQL server for tests: `initdb` into a fresh temporary directory, `postgres`
//! on a free 127.0.0.1 port (its unix socket inside that directory), one database per
//! `fresh_database()` call, and a fast shutdown when the handle drops.
//!
//! PostgreSQL refuses to run as root. Run as root (as in CI containers), the harness hands the
//! directory to the `postgres` user (or `nobody` when there is none) and runs `initdb` and the
//! server as that user; run as anyone else, it runs them as the caller.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tempfile::TempDir;

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports tried when another process takes the free port first.
const PORT_TRIES: u32 = 3;
/// The superuser `initdb` creates; it logs in without a password (trust, 127.0.0.1 only).
const SUPERUSER: &str = "postgres";
/// Settings every server gets: room for many pools at once.
const COMMON_SETTINGS: &[&str] = &["max_connections=200"];
/// What `start` adds for tests: no waiting on the disk (a crash loses the cluster, which a
/// test never keeps anyway) and small shared memory, so many servers can run side by side.
const TEST_SETTINGS: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "shared_buffers=32MB",
];

/// A running PostgreSQL server that stops when dropped.
pub struct PgServer {
    // Fields drop in order: the server stops before its directory goes.
    process: ServerProcess,
    port: u16,
    next_db: AtomicU32,
    launch: Launch,
    _dir: TempDir,
}

/// How the server was started, so it can be started again on the same data and port.
struct Launch {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    dir: PathBuf,
    settings: Vec<String>,
    run_as: Option<RunAs>,
    starts: u32,
}

impl Launch {
    fn spawn(&mut self, port: u16) -> Result<ServerProcess> {
        self.starts += 1;
        let log = self.dir.join(format!("postgres-{}.log", self.starts));
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&self.sock);
        for setting in &self.settings {
            cmd.arg("-c").arg(setting);
        }
        let child = spawn_as(cmd, &self.dir, &log, self.run_as.as_ref())
            .with_context(|| format!("starting {}", self.bin.join("postgres").display()))?;
        Ok(ServerProcess { child, log })
    }
}

/// The postmaster; a fast shutdown on drop, then a kill if it does not stop in time.
struct ServerProcess {
    child: Child,
    log: PathBuf,
}

/// A system user to run the server as, when the tests run as root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

impl PgServer {
    /// Creates a cluster and starts the server with settings for tests (`fsync`,
    /// `synchronous_commit` and `full_page_writes` off, 32 MB of shared buffers); fails with the
    /// server's log when it does not come up within 30 s.
    pub async fn start() -> Result<Self> {
        Self::start_with(TEST_SETTINGS).await
    }

    /// Like [`PgServer::start`], but with PostgreSQL's default durability and memory settings
    /// (every commit waits for its WAL flush), for measurements that should hold in production.
    pub async fn start_durable() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Like [`PgServer::start`], but every commit that asks for it waits until its WAL is
    /// written (`synchronous_commit` on; the disk is still not flushed). A process crash
    /// (`crash_restart`) then loses what it loses in production: the commits made without
    /// waiting (the metastore's relaxed writes) whose WAL was still in memory.
    pub async fn start_crashable() -> Result<Self> {
        let settings: Vec<&str> = TEST_SETTINGS
            .iter()
            .copied()
            .filter(|s| !s.starts_with("synchronous_commit="))
            .collect();
        Self::start_with(&settings).await
    }

    /// The settings `start` uses on top of PostgreSQL's defaults, as `name=value`.
    pub fn test_settings() -> &'static [&'static str] {
        TEST_SETTINGS
    }

    /// Creates a cluster and starts the server with `settings` (`name=value`) on top of
    /// PostgreSQL's defaults.
    pub async fn start_with(settings: &[&str]) -> Result<Self> {
        let bin = bin_dir()?;
        let (dir, run_as) = work_dir()?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        fs::create_dir(&sock).context("creating the socket directory")?;
        if let Some(user) = &run_as {
            for path in [dir.path(), sock.as_path()] {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("handing {} to user {}", path.display(), user.name))?;
            }
        }
        initdb(&bin, dir.path(), &data, run_as.as_ref()).await?;
        let mut launch = Launch {
            bin,
            data,
            sock,
            dir: dir.path().to_path_buf(),
            settings: COMMON_SETTINGS
                .iter()
                .chain(settings)
                .map(|s| s.to_string())
                .collect(),
            run_as,
            starts: 0,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            // From here on, dropping `process` stops the server whatever happens.
            let mut process = launch.spawn(port)?;
            match process.wait_ready(port).await {
                Ok(()) => {
                    return Ok(PgServer {
                        process,
                        port,
                        next_db: AtomicU32::new(0),
                        launch,
                        _dir: dir,
                    });
                }
                // Another process took the free port first: stop, and try another one.
                Err(_) if attempt < PORT_TRIES && process.port_was_taken() => drop(process),
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the server (fast shutdown) and starts it again on the same data and port, as an
    /// operator's restart does; clients see their connections drop meanwhile.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.stop();
        let mut process = self.launch.spawn(self.port)?;
        process.wait_ready(self.port).await?;
        self.process = process;
        Ok(())
    }

    /// Crashes the server (an immediate shutdown: no checkpoint, and whatever its processes
    /// held in memory is gone, WAL not yet written included) and starts it again on the same
    /// data and port; it recovers from its WAL.
    pub async fn crash_restart(&mut self) -> Result<()> {
        self.process.signal_and_wait("-QUIT");
        let mut process = self.launch.spawn(self.port)?;
        process.wait_ready(self.port).await?;
        self.process = process;
        Ok(())
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// A URL of the `postgres` maintenance database, as the superuser.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// A URL of database `db` on this server, as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub async fn fresh_database(&self) -> Result<String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("nightshift_{n}");
        let mut conn = PgConnection::connect(&self.admin_url())
            .await
            .context("connecting to the test server")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        Ok(self.url(&name))
    }
}

impl ServerProcess {
    async fn wait_ready(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("postgres://{SUPERUSER}@127.0.0.1:{port}/postgres");
        loop {
            if let Some(status) = self.child.try_wait().context("polling postgres")? {
                bail!(
                    "postgres exited ({status}) before accepting connections; log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            let connect = PgConnection::connect(&url);
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                conn.close().await.ok();
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not accept connections on 127.0.0.1:{port} within {:?}; \
                     log {}:\n{}",
                    START_TIMEOUT,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn port_was_taken(&self) -> bool {
        let log = log_tail(&self.log);
        log.contains("could not bind") || log.contains("could not create any TCP/IP sockets")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ServerProcess {
    /// A fast shutdown, then a kill if it does not stop in time.
    fn stop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: roll back open transactions, close
        // connections, write a checkpoint, exit.
        self.signal_and_wait("-INT");
    }

    /// Sends `signal` (as `kill` spells it) and waits for the exit, then kills the server if
    /// it does not stop in time.
    fn signal_and_wait(&mut self, signal: &str) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let signalled = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if signalled {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Its backends notice the postmaster's death and exit on their own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory holding `initdb` and `postgres`: the one `initdb` on PATH resolves into, or
/// the newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("initdb"))
                .filter(|p| p.is_file())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut candidates: Vec<PathBuf> = on_path
        .into_iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    candidates.extend(versions.into_iter().map(|(_, dir)| dir));
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        .context(
            "PostgreSQL server binaries (initdb, postgres) not found on PATH nor in \
             /usr/lib/postgresql/*/bin: run `.ci/run`, which installs them, or install \
             postgresql (e.g. `apt-get install postgresql`)",
        )
}

/// A fresh directory, and the user to run the server as when we are root (then the directory
/// must be reachable by that user, so it goes under /tmp if TMPDIR is not).
fn work_dir() -> Result<(TempDir, Option<RunAs>)> {
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("nightshift-pg-");
        b
    };
    let dir = builder()
        .tempdir()
        .context("creating a temporary directory")?;
    let owner = fs::metadata(dir.path())
        .context("reading the temporary directory")?
        .uid();
    if owner != 0 {
        return Ok((dir, None));
    }
    let user = system_user(SUPERUSER)
        .or_else(|| system_user("nobody"))
        .context("running as root, and neither a `postgres` nor a `nobody` user exists to run PostgreSQL as")?;
    let reachable = dir
        .path()
        .ancestors()
        .skip(1)
        .all(|a| fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    let dir = if reachable {
        dir
    } else {
        builder()
            .tempdir_in("/tmp")
            .context("creating a temporary directory in /tmp")?
    };
    Ok((dir, Some(user)))
}

/// Looks a user up in /etc/passwd.
fn system_user(name: &str) -> Option<RunAs> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        Some(RunAs {
            name: name.to_owned(),
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

async fn initdb(bin: &Path, dir: &Path, data: &Path, run_as: Option<&RunAs>) -> Result<()> {
    let log = dir.join("initdb.log");
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args(["--username", SUPERUSER, "--auth", "trust"])
        .args(["--encoding", "UTF8", "--locale", "C", "--no-sync"]);
    let mut child = spawn_as(cmd, dir, &log, run_as)
        .with_context(|| format!("starting {}", bin.join("initdb").display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for initdb")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "initdb took over {START_TIMEOUT:?}; log:\n{}",
                log_tail(&log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !status.success() {
        bail!("initdb failed ({status}); log:\n{}", log_tail(&log));
    }
    Ok(())
}

/// Starts `cmd` in `dir` with its output in `log`, as `run_as` when given.
fn spawn_as(mut cmd: Command, dir: &Path, log: &Path, run_as: Option<&RunAs>) -> Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating the log handle")?;
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST");
    if let Some(user) = run_as {
        // std drops the supplementary groups too when it switches away from root.
        cmd.uid(user.uid).gid(user.gid);
        cmd.env("USER", &user.name).env("LOGNAME", &user.name);
    }
    Ok(cmd.spawn()?)
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = fs::File::open(path) else {
        return format!("({} unreadable)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// For synchronous tests: a runtime, a PostgreSQL server started on it and a fresh database's
/// URL. Keep all three alive for the test.
pub fn server_with_database() -> (tokio::runtime::Runtime, PgServer, String) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(PgServer::start()).expect("postgres");
    let url = rt.block_on(pg.fresh_database()).expect("database");
    (rt, pg, url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_serves_fresh_databases_and_stops() {
        let server = PgServer::start().await.unwrap();
        let a = server.fresh_database().await.unwrap();
        let b = server.fresh_database().await.unwrap();
        assert_ne!(a, b);
        let mut conn = PgConnection::connect(&b).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
        conn.close().await.unwrap();
        let pid = server.pid();
        let port = server.port();
        drop(server);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "postgres {pid} still runs after drop"
        );
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
