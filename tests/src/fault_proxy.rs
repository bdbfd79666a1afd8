//! An HTTP/1.1 proxy in front of the local S3 server that injects faults on a fraction of the
//! requests: added delay, `503 SlowDown`, `500 InternalError`, and dropped connections.
//!
//! Safety of retries: the default faults all happen *before* the request is forwarded, so the
//! server never sees a faulted request and a client's retry is always safe, even for requests
//! that are not idempotent (create-only PUT with `If-None-Match: *`, CompleteMultipartUpload).
//! Faults that happen *after* the server processed the request ([`Fault::DropResponse`]) are a
//! separate opt-in kind: a retry may then meet its own earlier success (`412`, so
//! "already exists", for a create-only PUT; `NoSuchUpload` for a completed multipart upload),
//! which is exactly what a test of that situation wants and every other test must avoid.
//!
//! A fault never corrupts a successful response: the proxy reads the server's whole response
//! before it sends a byte of it, so a client sees either a clean error, a closed connection, or
//! the complete and correct response. Client connections are kept alive across requests; each
//! forwarded request opens its own connection to the server (moto closes after every answer).
//! Request bodies (fixed length or chunked) are forwarded intact; responses are re-framed with
//! `Content-Length`.
//!
//! The proxy runs on a runtime of its own, so a test that blocks its thread on a child process
//! does not stall it. Decisions are deterministic for a seed: the n-th request to arrive gets
//! the same fault in every run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// How long the proxy waits for the server to answer one request.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Waits `FaultPlan::delay`, then forwards normally.
    Delay,
    /// Answers `503 SlowDown` without forwarding.
    SlowDown,
    /// Answers `500 InternalError` without forwarding.
    InternalError,
    /// Reads the whole request, then closes the connection without forwarding or answering.
    Reset,
    /// Opt-in: closes the connection right after the request head, before reading its body
    /// (the client may see a reset while still sending). Not forwarded; object_store retries
    /// this only for requests it deems idempotent, so a create-only PUT can fail on it.
    CutRequest,
    /// Opt-in: forwards, reads the server's whole response, then closes the connection
    /// without sending it. The server *did* process the request: see the module docs.
    DropResponse,
}

impl Fault {
    /// The kinds a plan uses unless told otherwise: all of them before forwarding, so retries
    /// are always safe.
    pub const SAFE: [Fault; 4] = [
        Fault::Delay,
        Fault::SlowDown,
        Fault::InternalError,
        Fault::Reset,
    ];
}

/// Which requests get which fault.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Seeds the per-request decisions.
    pub seed: u64,
    /// Fraction of requests that get a fault (0.0 to 1.0).
    pub rate: f64,
    /// Kinds drawn for a faulted request, each with a weight.
    pub kinds: Vec<(Fault, u32)>,
    /// The delay of `Fault::Delay`.
    pub delay: Duration,
    /// Stop injecting after this many faults (None: never stop).
    pub max_faults: Option<u64>,
}

impl FaultPlan {
    /// `rate` of requests faulted, the safe kinds equally likely, 200 ms delays.
    pub fn new(seed: u64, rate: f64) -> Self {
        Self {
            seed,
            rate,
            kinds: Fault::SAFE.iter().map(|k| (*k, 1)).collect(),
            delay: Duration::from_millis(200),
            max_faults: None,
        }
    }

    /// No faults: a plain proxy.
    pub fn none() -> Self {
        Self::new(0, 0.0)
    }

    /// At most `n` faults in all; requests after those pass untouched.
    pub fn with_max_faults(mut self, n: u64) -> Self {
        self.max_faults = Some(n);
        self
    }

    /// Only these kinds, equally likely.
    pub fn with_kinds(mut self, kinds: &[Fault]) -> Self {
        self.kinds = kinds.iter().map(|k| (*k, 1)).collect();
        self
    }

    /// The fault of the `n`-th request (counting from 0), if any.
    fn decide(&self, n: u64, rate: f64) -> Option<Fault> {
        let total: u64 = self.kinds.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let r = splitmix64(self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        if unit >= rate {
            return None;
        }
        let mut pick = splitmix64(r) % total;
        for (kind, w) in &self.kinds {
            let w = u64::from(*w);
            if pick < w {
                return Some(*kind);
            }
            pick -= w;
        }
        None
    }
}

/// What the proxy has seen and done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Client connections accepted (fewer than requests when clients keep connections alive).
    pub connections: u64,
    /// Requests whose head was read.
    pub requests: u64,
    /// Requests sent on to the server (delayed ones and `DropResponse` included).
    pub forwarded: u64,
    /// Faults injected, by kind.
    pub faults: HashMap<Fault, u64>,
    /// Forwarded requests that failed at the server's end (no connection, broken answer).
    pub upstream_errors: u64,
}

impl FaultStats {
    pub fn count(&self, kind: Fault) -> u64 {
        self.faults.get(&kind).copied().unwrap_or(0)
    }

    /// Faults of every kind.
    pub fn total_faults(&self) -> u64 {
        self.faults.values().sum()
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    forwarded: AtomicU64,
    upstream_errors: AtomicU64,
    delay: AtomicU64,
    slow_down: AtomicU64,
    internal_error: AtomicU64,
    reset: AtomicU64,
    cut_request: AtomicU64,
    drop_response: AtomicU64,
}

impl Counters {
    fn of(&self, kind: Fault) -> &AtomicU64 {
        match kind {
            Fault::Delay => &self.delay,
            Fault::SlowDown => &self.slow_down,
            Fault::InternalError => &self.internal_error,
            Fault::Reset => &self.reset,
            Fault::CutRequest => &self.cut_request,
            Fault::DropResponse => &self.drop_response,
        }
    }
}

/// One request the proxy forwarded and the size of the body it answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    pub response_body_bytes: u64,
}

struct Shared {
    upstream: SocketAddr,
    /// Every forwarded request, in the order answered.
    exchanges: std::sync::Mutex<Vec<Exchange>>,
    plan: FaultPlan,
    /// The plan's rate, changeable while running (f64 bits).
    rate: AtomicU64,
    counters: Counters,
    /// Faults drawn so far, for `max_faults`.
    drawn: AtomicU64,
}

/// A running proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            exchanges: Default::default(),
            rate: AtomicU64::new(plan.rate.to_bits()),
            plan,
            counters: Counters::default(),
            drawn: AtomicU64::new(0),
        });
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(listener)?
        };
        runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for clients to use as their S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the fraction of requests faulted from now on.
    pub fn set_rate(&self, rate: f64) {
        self.shared.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Every request forwarded so far, with the bytes of its answer's body.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared
            .exchanges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let faults = [
            Fault::Delay,
            Fault::SlowDown,
            Fault::InternalError,
            Fault::Reset,
            Fault::CutRequest,
            Fault::DropResponse,
        ]
        .into_iter()
        .map(|k| (k, load(c.of(k))))
        .filter(|(_, n)| *n > 0)
        .collect();
        FaultStats {
            connections: load(&c.connections),
            requests: load(&c.requests),
            forwarded: load(&c.forwarded),
            faults,
            upstream_errors: load(&c.upstream_errors),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Drops every task (so every socket) without blocking; allowed inside async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, shared.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One request or response head.
struct Head {
    /// The request line or status line.
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn framing(&self) -> std::io::Result<Framing> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Framing::Chunked);
        }
        match self.header("content-length") {
            Some(v) => v
                .trim()
                .parse()
                .map(Framing::Length)
                .map_err(|_| invalid("bad content-length")),
            None => Ok(Framing::None),
        }
    }
}

enum Framing {
    Length(u64),
    Chunked,
    /// No length given: a request has no body, a response runs to the end of the connection.
    None,
}

/// Headers that describe one connection, not the message: never passed on.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "expect",
        "te",
        "trailer",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// Serves one client connection, request after request, until it closes or a fault drops it.
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let head = match read_head(&mut read).await {
            Ok(Some(h)) => h,
            _ => return,
        };
        let n = shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let rate = f64::from_bits(shared.rate.load(Ordering::Relaxed));
        let fault = shared.plan.decide(n, rate).filter(|_| {
            let max = shared.plan.max_faults.unwrap_or(u64::MAX);
            shared.drawn.fetch_add(1, Ordering::Relaxed) < max
        });
        if let Some(kind) = fault {
            shared.counters.of(kind).fetch_add(1, Ordering::Relaxed);
        }
        if fault == Some(Fault::CutRequest) {
            return;
        }
        let close_after = head.has_token("connection", "close");
        if head.has_token("expect", "100-continue")
            && write
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return;
        }
        let body = match head.framing() {
            Ok(Framing::Length(n)) => read_exact_body(&mut read, n).await,
            Ok(Framing::Chunked) => read_chunked(&mut read).await,
            Ok(Framing::None) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let Ok(body) = body else { return };
        let answer = match fault {
            Some(Fault::Reset) => {
                let _ = write.shutdown().await;
                return;
            }
            Some(Fault::SlowDown) => s3_error(
                503,
                "Slow Down",
                "SlowDown",
                "Please reduce your request rate.",
            ),
            Some(Fault::InternalError) => s3_error(
                500,
                "Internal Server Error",
                "InternalError",
                "We encountered an internal error. Please try again.",
            ),
            _ => {
                if fault == Some(Fault::Delay) {
                    tokio::time::sleep(shared.plan.delay).await;
                }
                shared.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                let sent =
                    tokio::time::timeout(UPSTREAM_TIMEOUT, forward(shared.upstream, &head, &body))
                        .await;
                match sent {
                    Ok(Ok(response)) => {
                        record(&shared, &head, &response);
                        response
                    }
                    _ => {
                        // The server failed us: the client sees a closed connection, which
                        // it treats as a transport error.
                        shared
                            .counters
                            .upstream_errors
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        };
        if fault == Some(Fault::DropResponse) {
            let _ = write.shutdown().await;
            return;
        }
        let mut out = answer.head;
        if close_after {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if write.write_all(&out).await.is_err() || write.write_all(&answer.body).await.is_err() {
            return;
        }
        if close_after {
            let _ = write.shutdown().await;
            return;
        }
    }
}

fn record(shared: &Shared, head: &Head, answer: &Answer) {
    let mut parts = head.first.split(' ');
    let exchange = Exchange {
        method: parts.next().unwrap_or_default().to_string(),
        target: parts.next().unwrap_or_default().to_string(),
        response_body_bytes: answer.body.len() as u64,
    };
    shared
        .exchanges
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(exchange);
}

/// A response ready to send: status line and headers (without the blank line), and body.
struct Answer {
    head: Vec<u8>,
    body: Vec<u8>,
}

fn s3_error(status: u16, reason: &str, code: &str, message: &str) -> Answer {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    )
    .into_bytes();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    Answer { head, body }
}

/// Sends one request to the server on a fresh connection and reads its whole response.
async fn forward(upstream: SocketAddr, head: &Head, body: &[u8]) -> std::io::Result<Answer> {
    let stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut req = Vec::with_capacity(1024 + body.len());
    req.extend_from_slice(head.first.as_bytes());
    req.extend_from_slice(b"\r\n");
    for (n, v) in head.headers.iter().filter(|(n, _)| !hop_by_hop(n)) {
        req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    let had_body = !matches!(head.framing()?, Framing::None);
    if had_body {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    req.extend_from_slice(body);
    write.write_all(&req).await?;

    let method = head.first.split(' ').next().unwrap_or("");
    let mut read = BufReader::new(read);
    let resp = loop {
        let h = read_head(&mut read)
            .await?
            .ok_or_else(|| invalid("server closed before answering"))?;
        let status = status_of(&h)?;
        // Interim answers (100 Continue) are not passed on.
        if !(100..200).contains(&status) {
            break h;
        }
    };
    let status = status_of(&resp)?;
    let bodiless = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    let mut out = Vec::new();
    out.extend_from_slice(resp.first.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (n, v) in resp.headers.iter() {
        // A bodiless answer keeps its Content-Length: it describes the object (HEAD).
        let keep = !hop_by_hop(n) || (bodiless && n.eq_ignore_ascii_case("content-length"));
        if keep {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
    }
    let body = if bodiless {
        Vec::new()
    } else {
        let b = match resp.framing()? {
            Framing::Length(n) => read_exact_body(&mut read, n).await?,
            Framing::Chunked => read_chunked(&mut read).await?,
            Framing::None => {
                let mut b = Vec::new();
                read.read_to_end(&mut b).await?;
                b
            }
        };
        out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
        b
    };
    Ok(Answer { head: out, body })
}

fn status_of(h: &Head) -> std::io::Result<u16> {
    h.first
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("bad status line"))
}

/// Reads a head up to its blank line; None when the peer closed before sending anything.
async fn read_head<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    let mut headers = Vec::new();
    let mut size = 0;
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).await?;
        if n == 0 {
            if first.is_empty() && headers.is_empty() {
                return Ok(None);
            }
            return Err(invalid("connection closed inside a head"));
        }
        size += n;
        if size > MAX_HEAD {
            return Err(invalid("head too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if first.is_empty() {
            // Tolerate blank lines before a request line.
            if !l.is_empty() {
                first = l.to_string();
            }
            continue;
        }
        if l.is_empty() {
            return Ok(Some(Head { first, headers }));
        }
        let (name, value) = l.split_once(':').ok_or_else(|| invalid("bad header"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
}

async fn read_exact_body<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    n: u64,
) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(n).map_err(|_| invalid("body too large"))?;
    let mut b = vec![0; len];
    r.read_exact(&mut b).await?;
    Ok(b)
}

/// Decodes a chunked body (trailers read and dropped).
async fn read_chunked<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(invalid("connection closed inside a chunked body"));
        }
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            loop {
                line.clear();
                if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).await?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).await?;
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_deterministic_and_near_the_rate() {
        let plan = FaultPlan::new(7, 0.1);
        let a: Vec<_> = (0..10_000).map(|n| plan.decide(n, plan.rate)).collect();
        let b: Vec<_> = (0..10_000).map(|n| plan.decide(n, plan.rate)).collect();
        assert_eq!(a, b);
        let faulted = a.iter().filter(|f| f.is_some()).count();
        assert!((800..1200).contains(&faulted), "{faulted}");
        for kind in Fault::SAFE {
            assert!(a.contains(&Some(kind)), "{kind:?} never drawn");
        }
        assert!(!a.contains(&Some(Fault::DropResponse)));
        assert!((0..1000).all(|n| FaultPlan::none().decide(n, 0.0).is_none()));
    }
}
