//! An HTTP proxy in front of moto's EC2 that plays a region out of spot capacity.
//!
//! moto launches every spot instance it is asked for, so the fleet scaler's on-demand fallback
//! cannot be reached through it alone. [`SpotRefusal`] forwards every request to moto
//! unchanged (method, path, query, headers, body) and passes moto's answer back, except while
//! refusing: then a `CreateFleet` that asks for spot (`DefaultTargetCapacityType=spot`) is
//! answered the way EC2 answers an `instant` fleet that found no spot capacity: HTTP 200, a
//! fleet id, one `errorSet` item per requested override (lifecycle `spot`, code
//! `InsufficientInstanceCapacity`) and an empty `fleetInstanceSet`. Nothing reaches moto for a
//! refused request, so no instance exists behind it.
//!
//! The proxy runs on a runtime of its own (as [`crate::fault_proxy`] does) and stops, closing
//! its connections, when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// EC2's XML namespace (the API version the SDKs speak).
const EC2_NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
/// The error code EC2 gives an override it found no capacity for.
pub const REFUSAL_CODE: &str = "InsufficientInstanceCapacity";
const REFUSAL_MESSAGE: &str = "There is no Spot capacity available that matches your request.";
/// Largest request body read (EC2 query requests are small).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Headers that describe one connection, not the message: never passed on.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::TE,
    header::UPGRADE,
];

struct Shared {
    /// moto's `http://127.0.0.1:PORT`.
    upstream: String,
    client: reqwest::Client,
    refusing: AtomicBool,
    refused: AtomicU64,
    forwarded: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct SpotRefusal {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl SpotRefusal {
    /// Listens on a free 127.0.0.1 port and forwards to moto at `upstream`; not refusing yet.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("spot-refusal")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let shared = Arc::new(Shared {
            upstream: format!("http://{upstream}"),
            client,
            refusing: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
        });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:PORT`: the endpoint to give an EC2 client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts or stops refusing spot fleets.
    pub fn set_refusing(&self, refusing: bool) {
        self.shared.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Spot `CreateFleet` requests answered with a refusal so far.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Requests passed on to moto so far.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for SpotRefusal {
    fn drop(&mut self) {
        // Drops every task (so every socket) without blocking; allowed inside async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    if shared.refusing.load(Ordering::SeqCst) {
        let form = form_pairs(&body);
        if is_spot_fleet(&form) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            return refusal(&form);
        }
    }
    shared.forwarded.fetch_add(1, Ordering::SeqCst);
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let sent = shared
        .client
        .request(parts.method, format!("{}{target}", shared.upstream))
        .headers(end_to_end(&parts.headers))
        .body(body)
        .send()
        .await;
    match sent {
        Ok(answer) => pass_back(answer).await,
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// moto's answer as the client's: status, end-to-end headers and the whole body.
async fn pass_back(answer: reqwest::Response) -> Response {
    let status = answer.status();
    let headers = end_to_end(answer.headers());
    match answer.bytes().await {
        Ok(body) => (status, headers, body).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in &HOP_BY_HOP {
        out.remove(name);
    }
    out
}

/// The pairs of a form-encoded body (EC2's query protocol), in order.
fn form_pairs(body: &Bytes) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    match reqwest::Url::parse(&format!("http://form/?{text}")) {
        Ok(url) => url.query_pairs().into_owned().collect(),
        Err(_) => Vec::new(),
    }
}

fn value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn is_spot_fleet(form: &[(String, String)]) -> bool {
    value(form, "Action") == Some("CreateFleet")
        && value(
            form,
            "TargetCapacitySpecification.DefaultTargetCapacityType",
        ) == Some("spot")
}

/// What EC2 answers an instant spot fleet that found no capacity in any pool asked for.
fn refusal(form: &[(String, String)]) -> Response {
    let items: String = requested_overrides(form).iter().map(error_item).collect();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <CreateFleetResponse xmlns=\"{EC2_NAMESPACE}\">\
         <requestId>{}</requestId>\
         <fleetId>fleet-{}</fleetId>\
         <errorSet>{items}</errorSet>\
         <fleetInstanceSet/>\
         </CreateFleetResponse>",
        unique_id(),
        unique_id(),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/xml;charset=UTF-8")],
        xml,
    )
        .into_response()
}

/// One launch template config and one of its overrides, as the request named them.
struct Requested {
    template_name: Option<String>,
    template_id: Option<String>,
    version: Option<String>,
    instance_type: Option<String>,
    subnet_id: Option<String>,
}

/// Every (template config, override) pair of the request; a config without overrides counts
/// once.
fn requested_overrides(form: &[(String, String)]) -> Vec<Requested> {
    let mut out = Vec::new();
    for config in 1.. {
        let base = format!("LaunchTemplateConfigs.{config}");
        let spec = format!("{base}.LaunchTemplateSpecification");
        let get = |key: &str| value(form, key).map(str::to_string);
        let template_name = get(&format!("{spec}.LaunchTemplateName"));
        let template_id = get(&format!("{spec}.LaunchTemplateId"));
        if template_name.is_none() && template_id.is_none() {
            break;
        }
        let version = get(&format!("{spec}.Version"));
        let mut overrides = Vec::new();
        for n in 1.. {
            let o = format!("{base}.Overrides.{n}");
            let instance_type = get(&format!("{o}.InstanceType"));
            let subnet_id = get(&format!("{o}.SubnetId"));
            if instance_type.is_none() && subnet_id.is_none() {
                break;
            }
            overrides.push((instance_type, subnet_id));
        }
        if overrides.is_empty() {
            overrides.push((None, None));
        }
        out.extend(
            overrides
                .into_iter()
                .map(|(instance_type, subnet_id)| Requested {
                    template_name: template_name.clone(),
                    template_id: template_id.clone(),
                    version: version.clone(),
                    instance_type,
                    subnet_id,
                }),
        );
    }
    out
}

fn error_item(r: &Requested) -> String {
    let spec = element("launchTemplateId", &r.template_id)
        + &element("launchTemplateName", &r.template_name)
        + &element("version", &r.version);
    let overrides = element("instanceType", &r.instance_type) + &element("subnetId", &r.subnet_id);
    let overrides = if overrides.is_empty() {
        String::new()
    } else {
        format!("<overrides>{overrides}</overrides>")
    };
    format!(
        "<item><launchTemplateAndOverrides>\
         <launchTemplateSpecification>{spec}</launchTemplateSpecification>{overrides}\
         </launchTemplateAndOverrides>\
         <lifecycle>spot</lifecycle>\
         <errorCode>{REFUSAL_CODE}</errorCode>\
         <errorMessage>{REFUSAL_MESSAGE}</errorMessage></item>"
    )
}

fn element(name: &str, value: &Option<String>) -> String {
    value
        .as_deref()
        .map(|v| format!("<{name}>{}</{name}>", escape(v)))
        .unwrap_or_default()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A UUID-shaped id, different for every call (as EC2's request and fleet ids are).
fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = nanos ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 96);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (n >> 96) as u32,
        (n >> 80) as u16,
        (n >> 64) as u16,
        (n >> 48) as u16,
        n as u64 & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_spot_create_fleet_is_refused() {
        let spot = form(&[
            ("Action", "CreateFleet"),
            (
                "TargetCapacitySpecification.DefaultTargetCapacityType",
                "spot",
            ),
        ]);
        assert!(is_spot_fleet(&spot));
        let on_demand = form(&[
            ("Action", "CreateFleet"),
            (
                "TargetCapacitySpecification.DefaultTargetCapacityType",
                "on-demand",
            ),
        ]);
        assert!(!is_spot_fleet(&on_demand));
        assert!(!is_spot_fleet(&form(&[("Action", "DescribeInstances")])));
    }

    #[test]
    fn form_bodies_are_decoded() {
        let pairs = form_pairs(&Bytes::from_static(
            b"Action=CreateFleet&LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version=%24Latest",
        ));
        assert_eq!(
            value(
                &pairs,
                "LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version"
            ),
            Some("$Latest")
        );
    }

    #[test]
    fn one_error_item_per_override() {
        let req = form(&[
            (
                "LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateName",
                "lt",
            ),
            (
                "LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version",
                "$Latest",
            ),
            (
                "LaunchTemplateConfigs.1.Overrides.1.InstanceType",
                "m5.large",
            ),
            ("LaunchTemplateConfigs.1.Overrides.1.SubnetId", "subnet-a"),
            (
                "LaunchTemplateConfigs.1.Overrides.2.InstanceType",
                "c5.large",
            ),
            ("LaunchTemplateConfigs.1.Overrides.2.SubnetId", "subnet-a"),
        ]);
        let requested = requested_overrides(&req);
        assert_eq!(requested.len(), 2);
        let item = error_item(&requested[1]);
        assert!(
            item.contains("<instanceType>c5.large</instanceType>"),
            "{item}"
        );
        assert!(
            item.contains("<launchTemplateName>lt</launchTemplateName>"),
            "{item}"
        );
        assert!(item.contains("<errorCode>InsufficientInstanceCapacity</errorCode>"));
    }
}
