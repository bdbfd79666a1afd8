//! Completion callbacks: when a job that names a `[notify] url` (or a coordinator-wide default)
//! ends, its final status JSON is POSTed there, signed with HMAC-SHA256 over the body
//! (`x-nightshift-signature: sha256=<hex>`), and tried again with backoff until a 2xx answer or
//! the deadline after the job's end. Every try is recorded in the metastore, which hands each
//! due callback to one replica at a time, so delivery is at least once.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use nightshift_metastore::{DueNotification, LeaseTiming, NotifyOutcome};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// The header carrying `sha256=` and the hex HMAC-SHA256 of the body under the secret.
pub const SIGNATURE_HEADER: &str = "x-nightshift-signature";
/// The header naming the job (its numeric id).
pub const JOB_HEADER: &str = "x-nightshift-job";
/// How often the notifier looks for callbacks that are due.
const NOTIFY_EVERY: Duration = Duration::from_millis(500);
/// Callbacks one pass takes.
const NOTIFY_BATCH: u32 = 16;
/// How long one POST may take before it counts as unanswered.
const TRY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a try holds its callback from other replicas: past its timeout, with room.
const TRY_HOLD: Duration = Duration::from_secs(30);
/// How much of an error without an answer is recorded.
const MAX_ERROR_CHARS: usize = 500;

/// Where callbacks go by default, how they are signed and how long they are tried.
#[derive(Clone)]
pub struct CallbackConfig {
    /// For jobs whose spec names no `[notify] url`.
    pub default_url: Option<String>,
    /// The HMAC-SHA256 key. Without one the coordinator refuses jobs that want a callback.
    pub secret: Option<Arc<[u8]>>,
    /// The delay after the first failed try; it doubles per try up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A callback not acknowledged within this long after its job ended is abandoned.
    pub deadline: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            default_url: None,
            secret: None,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            deadline: Duration::from_secs(24 * 3600),
        }
    }
}

impl std::fmt::Debug for CallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackConfig")
            .field("default_url", &self.default_url)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl CallbackConfig {
    /// The delay before try `attempt + 1`: the lease backoff's rule, with these bounds.
    fn retry_in_ms(&self, attempt: u32) -> i64 {
        let rule = LeaseTiming {
            ttl_ms: 0,
            backoff_base_ms: millis(self.backoff_base),
            backoff_max_ms: millis(self.backoff_max),
        };
        rule.backoff_ms(i64::from(attempt))
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts the callbacks that are due until `shutdown`. A coordinator without a secret cannot
/// sign, so it leaves them to a replica that can.
pub async fn notifier(service: Service, config: CallbackConfig, shutdown: CancellationToken) {
    let Some(secret) = config.secret.clone() else {
        return;
    };
    let http = match reqwest::Client::builder()
        .timeout(TRY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for callbacks; none will be posted");
            return;
        }
    };
    let notifier = Notifier {
        service,
        config,
        secret,
        http,
    };
    loop {
        if let Err(e) = notifier.pass().await {
            tracing::warn!(error = %e, "callback pass failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(NOTIFY_EVERY) => {}
        }
    }
}

struct Notifier {
    service: Service,
    config: CallbackConfig,
    secret: Arc<[u8]>,
    http: reqwest::Client,
}

impl Notifier {
    /// Tries each due callback once and records how it went.
    async fn pass(&self) -> Result<(), nightshift_metastore::StoreError> {
        let store = &self.service.store;
        for due in store
            .claim_notifications(NOTIFY_BATCH, millis(TRY_HOLD))
            .await?
        {
            let outcome = self.try_once(&due).await;
            match &outcome {
                NotifyOutcome::Delivered { status } => {
                    tracing::info!(
                        job = due.job_id,
                        attempt = due.attempt,
                        status,
                        "callback delivered"
                    )
                }
                NotifyOutcome::Failed {
                    status,
                    error,
                    retry_in_ms,
                } => tracing::warn!(
                    job = due.job_id,
                    attempt = due.attempt,
                    ?status,
                    ?error,
                    ?retry_in_ms,
                    "callback not acknowledged"
                ),
            }
            store
                .record_notification(due.job_id, due.attempt, &outcome)
                .await?;
        }
        Ok(())
    }

    async fn try_once(&self, due: &DueNotification) -> NotifyOutcome {
        let body = match self.body(due.job_id).await {
            Ok(body) => body,
            Err(e) => return self.failed(due, None, Some(e)).await,
        };
        let answer = self
            .http
            .post(&due.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.secret, &body))
            .header(JOB_HEADER, due.job_id)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(r) if r.status().is_success() => NotifyOutcome::Delivered {
                status: r.status().as_u16(),
            },
            Ok(r) => self.failed(due, Some(r.status().as_u16()), None).await,
            Err(e) => self.failed(due, None, Some(e.to_string())).await,
        }
    }

    /// The job's status as `GET /v1/jobs/{id}` answers it.
    async fn body(&self, job_id: i64) -> Result<Vec<u8>, String> {
        let job = self
            .service
            .store
            .job(job_id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("job {job_id} is gone"))?;
        let view = self.service.view(&job).await.map_err(|e| e.to_string())?;
        serde_json::to_vec(&view).map_err(|e| e.to_string())
    }

    /// A try that was not acknowledged: again after a backoff, or abandoned when that would
    /// pass the deadline after the job's end.
    async fn failed(
        &self,
        due: &DueNotification,
        status: Option<u16>,
        error: Option<String>,
    ) -> NotifyOutcome {
        let retry_in_ms = self.config.retry_in_ms(due.attempt);
        let ended = match self.service.store.job(due.job_id).await {
            Ok(Some(job)) => job.finished_at_ms,
            _ => None,
        };
        let now = self.service.store.now_ms().await.ok();
        let past_deadline = match (ended, now) {
            (Some(ended), Some(now)) => now + retry_in_ms > ended + millis(self.config.deadline),
            _ => false,
        };
        NotifyOutcome::Failed {
            status,
            error: error.map(|e| e.chars().take(MAX_ERROR_CHARS).collect()),
            retry_in_ms: (!past_deadline).then_some(retry_in_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tries_back_off_up_to_the_maximum() {
        let config = CallbackConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
            ..CallbackConfig::default()
        };
        let delays: Vec<i64> = (1..=4).map(|a| config.retry_in_ms(a)).collect();
        assert_eq!(delays, [100, 200, 350, 350]);
    }
}
