//! The people-and-services side of the HTTP API: jobs (submit, list, get, cancel) and
//! schedules.

use anyhow::{Result, anyhow};
use nightshift_proto::ErrorBody;
use nightshift_proto::wire::{JobList, JobQuery, JobView, SubmitResponse};
use reqwest::StatusCode;

/// Where the coordinator is and how to authenticate, from flags or the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Coordinator URL.
    #[arg(
        long,
        env = "NIGHTSHIFT_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// Bearer token (a submit token).
    #[arg(long, env = "NIGHTSHIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the token (a mounted secret, kept out of `ps`).
    #[arg(long, env = "NIGHTSHIFT_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    pub fn new(args: &ApiArgs) -> Result<Self> {
        let token = crate::token_files::one(
            args.token.as_deref(),
            args.token_file.as_deref(),
            "--token or --token-file (NIGHTSHIFT_TOKEN or NIGHTSHIFT_TOKEN_FILE)",
        )?;
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(600))
                .build()
                .unwrap_or_default(),
            base: args.coordinator.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, T)> {
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            anyhow!(
                "coordinator unreachable at {}: {}",
                self.base,
                nightshift_worker::client::error_chain(&e)
            )
        })?;
        let status = resp.status();
        let text = resp.text().await?;
        if status.is_success() {
            // A 204 has no body.
            let json = if text.is_empty() {
                "null"
            } else {
                text.as_str()
            };
            return Ok((status, serde_json::from_str(json)?));
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => Err(anyhow!("{} ({})", body.message, status)),
            Err(_) => Err(anyhow!("coordinator answered {status}: {text}")),
        }
    }

    pub async fn submit(&self, toml: String, key: Option<&str>) -> Result<SubmitResponse> {
        let mut req = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/toml")
            .body(toml);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        Ok(self.send(req).await?.1)
    }

    pub async fn list(&self, query: &JobQuery) -> Result<JobList> {
        let req = self.http.get(format!("{}/v1/jobs", self.base)).query(query);
        Ok(self.send(req).await?.1)
    }

    pub async fn get(&self, job: &str) -> Result<JobView> {
        Ok(self
            .send(self.http.get(format!("{}/v1/jobs/{job}", self.base)))
            .await?
            .1)
    }

    /// `GET` of an API path (`/v1/...`).
    pub async fn get_path<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await?
            .1)
    }

    /// `POST` of an API path, with a JSON body or none.
    pub async fn post_path<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T> {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(body);
        }
        Ok(self.send(req).await?.1)
    }

    /// `DELETE` of an API path, which answers no body.
    pub async fn delete_path(&self, path: &str) -> Result<()> {
        let req = self.http.delete(format!("{}{path}", self.base));
        self.send::<serde::de::IgnoredAny>(req).await.map(|_| ())
    }

    /// Asks the coordinator to change a job's state (`POST /v1/jobs/{job}/<action>`).
    pub async fn act(&self, job: &str, action: JobAction) -> Result<JobView> {
        let url = format!("{}/v1/jobs/{job}/{}", self.base, action.path());
        Ok(self.send(self.http.post(url)).await?.1)
    }
}

/// What a submit token may ask of a job besides reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    /// Stop it; its leases learn it at their next heartbeat.
    Cancel,
    /// Run a failed or cancelled job's dead and unfinished shards again.
    Retry,
}

impl JobAction {
    fn path(self) -> &'static str {
        match self {
            JobAction::Cancel => "cancel",
            JobAction::Retry => "retry",
        }
    }
}
