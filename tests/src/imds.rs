//! A stand-in for EC2's instance metadata service (IMDSv2), serving the spot interruption
//! notice protocol on 127.0.0.1: `PUT /latest/api/token` returns a session token;
//! `GET /latest/meta-data/spot/instance-action` with that token answers 404 until
//! `announce()`, then 200 with `{"action": "terminate", "time": "...Z"}`. Requests without the
//! token get 401, as IMDSv2 does. It also describes its instance (`instance-id`,
//! `instance-type`, `instance-life-cycle`) as `IDENTITY` says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};

#[derive(Default)]
struct State {
    announced: AtomicBool,
    polls: AtomicU64,
}

pub struct MetadataServer {
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

const TOKEN: &str = "imds-session-token";
/// The instance this server describes: id, type and life cycle.
pub const IDENTITY: [(&str, &str); 3] = [
    ("instance-id", "i-0fa11ce0fa11ce0fa"),
    ("instance-type", "g5.2xlarge"),
    ("instance-life-cycle", "spot"),
];

/// Answers one identity value, to holders of the session token only.
fn identity_route(router: Router, (key, value): (&'static str, &'static str)) -> Router {
    router.route(
        &format!("/latest/meta-data/{key}"),
        get(move |headers: HeaderMap| async move {
            if headers
                .get("x-aws-ec2-metadata-token")
                .and_then(|v| v.to_str().ok())
                != Some(TOKEN)
            {
                return (StatusCode::UNAUTHORIZED, String::new());
            }
            (StatusCode::OK, value.to_string())
        }),
    )
}

impl MetadataServer {
    pub async fn start() -> Self {
        let state = Arc::new(State::default());
        let s1 = state.clone();
        let app = Router::new()
            .route(
                "/latest/api/token",
                put(|headers: HeaderMap| async move {
                    if headers
                        .get("x-aws-ec2-metadata-token-ttl-seconds")
                        .is_none()
                    {
                        return (StatusCode::BAD_REQUEST, String::new());
                    }
                    (StatusCode::OK, TOKEN.to_string())
                }),
            )
            .route(
                "/latest/meta-data/spot/instance-action",
                get(move |headers: HeaderMap| {
                    let s = s1.clone();
                    async move {
                        s.polls.fetch_add(1, Ordering::Relaxed);
                        if headers
                            .get("x-aws-ec2-metadata-token")
                            .and_then(|v| v.to_str().ok())
                            != Some(TOKEN)
                        {
                            return (StatusCode::UNAUTHORIZED, String::new());
                        }
                        if s.announced.load(Ordering::Relaxed) {
                            (
                                StatusCode::OK,
                                r#"{"action": "terminate", "time": "2026-11-28T03:14:15Z"}"#
                                    .to_string(),
                            )
                        } else {
                            (StatusCode::NOT_FOUND, String::new())
                        }
                    }
                }),
            );
        let app = IDENTITY.into_iter().fold(app, identity_route);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, state, task }
    }

    /// From now on the notice is served.
    pub fn announce(&self) {
        self.state.announced.store(true, Ordering::Relaxed);
    }

    pub fn polls(&self) -> u64 {
        self.state.polls.load(Ordering::Relaxed)
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
