//! Spot interruption notices. On EC2 the instance metadata service announces a reclaim two
//! minutes ahead: IMDSv2 gives a session token on `PUT /latest/api/token`, then
//! `GET /latest/meta-data/spot/instance-action` answers 404 until a notice, and 200 with
//! `{"action": "terminate", "time": "...Z"}` once there is one. A notice means the same as
//! SIGTERM: stop taking shards, finish what is in flight, checkpoint, release, exit.

use std::time::{Duration, Instant};

use nightshift_proto::{CapacityType, InstanceInfo};
use tokio_util::sync::CancellationToken;

/// The link-local address EC2 serves instance metadata on.
pub const EC2_METADATA: &str = "http://169.254.169.254";
const TOKEN_TTL_S: u64 = 21_600;

#[derive(Debug, Clone)]
pub struct SpotWatcher {
    pub endpoint: String,
    pub every: Duration,
    /// Keep polling even when the first request finds no metadata service (set when the
    /// endpoint was given explicitly).
    pub insist: bool,
}

/// What the metadata service said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    None,
    Interruption { action: String, time: String },
}

/// Whether a watcher keeps polling after its first poll fails: when its endpoint was given
/// explicitly, or the worker runs on a spot instance it knows (given by flags, or read from the
/// metadata service at start), where a failed poll is a passing fault and giving up would let
/// a reclaim kill the worker without a drain. Elsewhere (not on EC2) it gives up at once.
pub fn keeps_polling(explicit_endpoint: bool, instance: Option<&InstanceInfo>) -> bool {
    explicit_endpoint || instance.is_some_and(|i| i.capacity_type == CapacityType::Spot)
}

impl SpotWatcher {
    pub fn new(endpoint: &str, every: Duration, insist: bool) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            every,
            insist,
        }
    }

    /// Polls until a notice arrives (then cancels `drain` and returns it) or `stop` fires.
    pub async fn run(self, drain: CancellationToken, stop: CancellationToken) -> Option<Notice> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_default();
        let mut token: Option<(String, Instant)> = None;
        let mut first = true;
        loop {
            match self.poll(&http, &mut token).await {
                Ok(Notice::None) => {}
                Ok(notice @ Notice::Interruption { .. }) => {
                    if let Notice::Interruption { action, time } = &notice {
                        tracing::warn!(%action, %time, "spot interruption notice: draining");
                    }
                    drain.cancel();
                    return Some(notice);
                }
                Err(e) if first && !self.insist => {
                    tracing::info!(endpoint = %self.endpoint, error = %e, "no instance metadata service: spot notices off");
                    return None;
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "spot notice poll failed")
                }
            }
            first = false;
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = drain.cancelled() => return None,
                _ = tokio::time::sleep(self.every) => {}
            }
        }
    }

    async fn poll(
        &self,
        http: &reqwest::Client,
        token: &mut Option<(String, Instant)>,
    ) -> Result<Notice, String> {
        let fresh = token
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(TOKEN_TTL_S - 300));
        if !fresh {
            *token = Some((session_token(http, &self.endpoint).await?, Instant::now()));
        }
        let t = token.as_ref().map(|(t, _)| t.clone()).unwrap_or_default();
        let resp = http
            .get(format!(
                "{}/latest/meta-data/spot/instance-action",
                self.endpoint
            ))
            .header("X-aws-ec2-metadata-token", t)
            .send()
            .await
            .map_err(|e| crate::client::error_chain(&e))?;
        match resp.status().as_u16() {
            404 => Ok(Notice::None),
            401 => {
                *token = None;
                Err("metadata token refused".into())
            }
            200 => {
                let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
                Ok(Notice::Interruption {
                    action: body["action"].as_str().unwrap_or("terminate").to_string(),
                    time: body["time"].as_str().unwrap_or("").to_string(),
                })
            }
            other => Err(format!("instance-action answered {other}")),
        }
    }
}

/// An IMDSv2 session token.
async fn session_token(http: &reqwest::Client, endpoint: &str) -> Result<String, String> {
    let resp = http
        .put(format!("{endpoint}/latest/api/token"))
        .header(
            "X-aws-ec2-metadata-token-ttl-seconds",
            TOKEN_TTL_S.to_string(),
        )
        .send()
        .await
        .map_err(|e| crate::client::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("token request answered {}", resp.status()));
    }
    resp.text().await.map_err(|e| e.to_string())
}

/// One metadata value (`/latest/meta-data/<path>`).
async fn metadata(
    http: &reqwest::Client,
    endpoint: &str,
    token: &str,
    path: &str,
) -> Result<String, String> {
    let resp = http
        .get(format!("{endpoint}/latest/meta-data/{path}"))
        .header("X-aws-ec2-metadata-token", token)
        .send()
        .await
        .map_err(|e| crate::client::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("{path} answered {}", resp.status()));
    }
    Ok(resp
        .text()
        .await
        .map_err(|e| e.to_string())?
        .trim()
        .to_string())
}

/// The instance this worker runs on, as the metadata service at `endpoint` describes it: its
/// id, its type, and whether it is spot (`instance-life-cycle`; anything else is on demand).
pub async fn instance_identity(endpoint: &str) -> Result<InstanceInfo, String> {
    let endpoint = endpoint.trim_end_matches('/');
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .map_err(|e| e.to_string())?;
    let token = session_token(&http, endpoint).await?;
    let id = metadata(&http, endpoint, &token, "instance-id").await?;
    let instance_type = metadata(&http, endpoint, &token, "instance-type").await?;
    let life_cycle = metadata(&http, endpoint, &token, "instance-life-cycle").await?;
    let capacity_type = match life_cycle.as_str() {
        "spot" => CapacityType::Spot,
        _ => CapacityType::OnDemand,
    };
    Ok(InstanceInfo {
        id,
        instance_type,
        capacity_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_on_a_spot_instance_it_knows_keeps_polling_after_a_failed_poll() {
        let on = |capacity_type| InstanceInfo {
            id: "i-0abc".into(),
            instance_type: "g5.xlarge".into(),
            capacity_type,
        };
        assert!(keeps_polling(true, None), "an endpoint given explicitly");
        assert!(keeps_polling(false, Some(&on(CapacityType::Spot))));
        assert!(!keeps_polling(false, Some(&on(CapacityType::OnDemand))));
        assert!(!keeps_polling(false, None), "not on EC2");
    }
}
