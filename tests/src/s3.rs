//! A throwaway S3-compatible server for tests: moto (`moto_server` from the project's venv) on a
//! free 127.0.0.1 port, killed when the handle drops. Objects live in the server's memory, so
//! each test that starts its own server (or uses its own bucket) starts clean.
//!
//! Quirks of moto 5.2.5 worth knowing: bucket names need at least three characters (shorter
//! ones get `400 InvalidBucketName`); unsigned requests may create buckets (`PUT /<bucket>`)
//! but reading an object needs a signed request (any keys do), unsigned GETs answer `403`; every
//! response carries `Connection: close`, so clients open a connection per request. moto checks
//! no signature unless started with `INITIAL_NO_AUTH_ACTION_COUNT` (`start_checking_signatures`),
//! which is how the requests nightshift signs itself are tested.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::TryStreamExt;
use nightshift_storage::s3::{S3Settings, StaticKeys};
use nightshift_storage::{Location, Stores};
use object_store::{ObjectStoreExt, PutPayload};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{ChildGuard, free_port};
use crate::python::venv;

/// How long moto may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried when another process takes the free port first.
const PORT_TRIES: u32 = 3;
/// Keys and region moto accepts (it accepts any).
pub const ACCESS_KEY_ID: &str = "test";
pub const SECRET_ACCESS_KEY: &str = "test";
pub const REGION: &str = "us-east-1";

/// A running moto server; stops when dropped.
pub struct S3Server {
    // Fields drop in order: the server stops before its log directory goes.
    child: ChildGuard,
    port: u16,
    stores: Stores,
    keys: StaticKeys,
    log: PathBuf,
    _dir: TempDir,
}

impl S3Server {
    /// Starts moto and waits until it answers; fails with its log when it does not within 30 s.
    pub async fn start() -> Result<Self> {
        Self::launch(&[]).await
    }

    /// Starts moto checking what it usually lets pass: every request's SigV4 signature (and
    /// IAM policy). Its key is made by `scripts/moto_iam_user.py`, which also creates
    /// `buckets` (unsigned requests, `create_bucket` included, are refused by such a server).
    pub async fn start_checking_signatures(buckets: &[&str]) -> Result<Self> {
        let mut server = Self::launch(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]).await?;
        let mut args = vec![server.endpoint()];
        args.extend(buckets.iter().map(|b| b.to_string()));
        let out = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::python::run_script("moto_iam_user.py", &args)
        })
        .await
        .context("moto_iam_user.py panicked")?;
        let (key_id, secret_key) = out
            .split_once(' ')
            .with_context(|| format!("moto_iam_user.py printed `{out}`"))?;
        server.keys = StaticKeys {
            key_id: key_id.trim().to_string(),
            secret_key: secret_key.trim().to_string(),
        };
        server.stores = Stores::new(server.settings());
        Ok(server)
    }

    async fn launch(envs: &[(&str, &str)]) -> Result<Self> {
        let bin = venv().join("bin/moto_server");
        if !bin.exists() {
            bail!(
                "{} not found: run scripts/setup.sh (it installs moto[server] into the venv)",
                bin.display()
            );
        }
        let dir = tempfile::tempdir().context("temp dir for the moto log")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let log = dir.path().join(format!("moto-{attempt}.log"));
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            cmd.envs(envs.iter().copied());
            let mut child = ChildGuard::spawn_logged(cmd, &log);
            match wait_ready(&mut child, port, &log).await {
                Ok(()) => {
                    return Ok(S3Server {
                        child,
                        port,
                        stores: Stores::new(settings(&format!("http://127.0.0.1:{port}"))),
                        keys: StaticKeys {
                            key_id: ACCESS_KEY_ID.to_string(),
                            secret_key: SECRET_ACCESS_KEY.to_string(),
                        },
                        log,
                        _dir: dir,
                    });
                }
                Err(_) if attempt < PORT_TRIES && log_tail(&log).contains("in use") => drop(child),
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`, for a proxy in front of the server.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        log_tail(&self.log)
    }

    /// What a child `nightshift` process needs in its environment to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = env_for(&self.endpoint());
        for (name, value) in &mut env {
            match *name {
                "AWS_ACCESS_KEY_ID" => *value = self.keys.key_id.clone(),
                "AWS_SECRET_ACCESS_KEY" => *value = self.keys.secret_key.clone(),
                _ => {}
            }
        }
        env
    }

    /// S3 settings for in-process clients of this server.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            static_keys: Some(self.keys.clone()),
            ..settings(&self.endpoint())
        }
    }

    /// The stores the helpers below use (one S3 client per bucket, cached).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Resolves `s3://bucket/key` against this server.
    pub fn locate(&self, uri: &str) -> Result<Location> {
        Ok(self.stores.locate(uri)?)
    }

    /// Creates a bucket (an unsigned `PUT /<bucket>`); names need three characters or more.
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let (status, body) = raw_request(self.port, "PUT", &format!("/{name}")).await?;
        if status != 200 {
            bail!("creating bucket {name}: {status} {body}");
        }
        Ok(())
    }

    /// Writes one object.
    pub async fn put(&self, uri: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let loc = self.locate(uri)?;
        loc.store()
            .put(loc.path(), PutPayload::from(bytes.into()))
            .await
            .with_context(|| format!("putting {uri}"))?;
        Ok(())
    }

    /// Writes an empty object at `key` as it is spelled, e.g. `in/2024/`: the "folder" an S3
    /// console makes (an unsigned PUT, which the emulator accepts).
    pub async fn put_folder_marker(&self, bucket: &str, key: &str) -> Result<()> {
        let (status, body) = raw_request(self.port, "PUT", &format!("/{bucket}/{key}")).await?;
        if status != 200 {
            bail!("PUT /{bucket}/{key}: {status} {body}");
        }
        Ok(())
    }

    /// Reads one whole object.
    pub async fn get(&self, uri: &str) -> Result<Bytes> {
        let loc = self.locate(uri)?;
        Ok(nightshift_storage::read_all(&loc).await?)
    }

    /// URIs of every object under `prefix` (`s3://bucket/some/prefix`), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let loc = self.locate(prefix)?;
        let root = prefix.split('/').take(3).collect::<Vec<_>>().join("/");
        let prefix_path = (!loc.path().as_ref().is_empty()).then(|| loc.path().clone());
        let metas: Vec<_> = loc
            .store()
            .list(prefix_path.as_ref())
            .try_collect()
            .await
            .with_context(|| format!("listing {prefix}"))?;
        let mut uris: Vec<String> = metas
            .into_iter()
            .map(|m| format!("{root}/{}", m.location))
            .collect();
        uris.sort();
        Ok(uris)
    }

    /// Deletes one object (a missing one is not an error, as in S3).
    pub async fn delete(&self, uri: &str) -> Result<()> {
        let loc = self.locate(uri)?;
        loc.store()
            .delete(loc.path())
            .await
            .with_context(|| format!("deleting {uri}"))?;
        Ok(())
    }

    /// Uploads every file under `dir` (recursively) to `prefix` (`s3://bucket/some/prefix/`),
    /// keeping relative paths; returns the URIs written, sorted.
    pub async fn upload_dir(&self, dir: &Path, prefix: &str) -> Result<Vec<String>> {
        let mut files = Vec::new();
        walk(dir, &mut files)?;
        files.sort();
        let base = prefix.trim_end_matches('/');
        let mut uris = Vec::new();
        for f in files {
            let rel = f.strip_prefix(dir).context("file outside the directory")?;
            let uri = format!("{base}/{}", rel.to_string_lossy());
            let data = tokio::fs::read(&f)
                .await
                .with_context(|| format!("reading {}", f.display()))?;
            self.put(&uri, data).await?;
            uris.push(uri);
        }
        Ok(uris)
    }
}

/// The environment a child process needs to reach an S3-compatible server at `endpoint`
/// (moto itself, or a proxy in front of it).
pub fn env_for(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
        ("AWS_REGION", REGION.to_string()),
    ]
}

/// S3 settings for in-process clients of the server at `endpoint`: plain http, fixed keys,
/// the default retries. Independent of the test process's own AWS_* environment.
pub fn settings(endpoint: &str) -> S3Settings {
    S3Settings {
        allow_http: true,
        region: Some(REGION.to_string()),
        endpoint: Some(endpoint.to_string()),
        static_keys: Some(StaticKeys {
            key_id: ACCESS_KEY_ID.to_string(),
            secret_key: SECRET_ACCESS_KEY.to_string(),
        }),
        ..Default::default()
    }
}

async fn wait_ready(child: &mut ChildGuard, port: u16, log: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait() {
            bail!(
                "moto_server exited ({status}) before answering; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        let probe = raw_request(port, "GET", "/moto-api/");
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "moto_server did not answer on 127.0.0.1:{port} within {START_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One unsigned HTTP/1.1 request without a body; the status and body of the answer.
async fn raw_request(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
