//! The scaler's loop: each tick it reads the coordinator's fleet view and the provider's
//! instances, decides (`decide.rs`), and acts: launches, asks workers to drain, terminates
//! instances that hold no lease. Every decision that acts is logged with its reason.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use nightshift_proto::FleetView;
use tokio_util::sync::CancellationToken;

use crate::decide::{Decision, Observation, Scaler};
use crate::metrics::ScalerMetrics;
use crate::provider::{LaunchRequest, Provider};

/// How long one request to the coordinator may take.
const COORDINATOR_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the coordinator is and how often to decide.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub coordinator: String,
    /// A submit token (`/v1/fleet` and drains are a submitter's operations).
    pub token: String,
    pub interval: Duration,
}

/// The coordinator's side of the scaler: the fleet view and drains.
struct Coordinator {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Coordinator {
    fn new(config: &LoopConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(COORDINATOR_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base: config.coordinator.trim_end_matches('/').to_string(),
            token: config.token.clone(),
        })
    }

    async fn fleet(&self) -> Result<FleetView> {
        let resp = self
            .http
            .get(format!("{}/v1/fleet", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .context("GET /v1/fleet")?;
        if !resp.status().is_success() {
            bail!(
                "GET /v1/fleet answered {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        resp.json().await.context("reading /v1/fleet")
    }

    async fn drain(&self, worker: &str) -> Result<()> {
        let resp = self
            .http
            .post(format!(
                "{}{}",
                self.base,
                nightshift_proto::drain_path(worker)
            ))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("asking worker {worker} to drain"))?;
        if !resp.status().is_success() {
            bail!("draining worker {worker} answered {}", resp.status());
        }
        Ok(())
    }
}

/// Runs the scaler until `shutdown`: one tick every `config.interval`; a tick that fails is
/// logged and counted, and the next one starts afresh.
pub async fn run<P: Provider>(
    config: LoopConfig,
    provider: P,
    mut scaler: Scaler,
    metrics: ScalerMetrics,
    shutdown: CancellationToken,
) -> Result<()> {
    let coordinator = Coordinator::new(&config)?;
    tracing::info!(coordinator = %coordinator.base, policy = ?scaler.policy(), "scaler started");
    loop {
        if let Err(e) = tick(&coordinator, &provider, &mut scaler, &metrics).await {
            tracing::warn!(error = format!("{e:#}"), "scaler tick failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(config.interval) => {}
        }
    }
}

async fn tick<P: Provider>(
    coordinator: &Coordinator,
    provider: &P,
    scaler: &mut Scaler,
    metrics: &ScalerMetrics,
) -> Result<()> {
    let fleet = coordinator
        .fleet()
        .await
        .inspect_err(|_| metrics.record_error("fleet"))?;
    let instances = provider
        .list()
        .await
        .inspect_err(|_| metrics.record_error("list"))?;
    let jobs: Vec<i64> = fleet
        .jobs
        .iter()
        .filter(|j| j.rows_pending > 0)
        .map(|j| j.job_id)
        .collect();
    let observation = Observation { fleet, instances };
    let decision = scaler.decide(&observation);
    metrics.record_decision(&decision, &observation.instances);
    log(&decision);
    if decision.launch > 0 {
        launch(provider, metrics, decision.launch, jobs).await?;
    }
    for worker in &decision.drain {
        match coordinator.drain(worker).await {
            Ok(()) => metrics.record_drain(),
            Err(e) => {
                metrics.record_error("drain");
                tracing::warn!(worker, error = format!("{e:#}"), "drain request failed");
            }
        }
    }
    if !decision.terminate.is_empty() {
        let ids: Vec<String> = decision
            .terminate
            .iter()
            .map(|(id, _)| id.clone())
            .collect();
        provider
            .terminate(&ids)
            .await
            .inspect_err(|_| metrics.record_error("terminate"))?;
        for (id, why) in &decision.terminate {
            metrics.record_terminated(why.as_str());
            tracing::info!(instance = %id, reason = why.as_str(), "instance terminated");
        }
    }
    Ok(())
}

async fn launch<P: Provider>(
    provider: &P,
    metrics: &ScalerMetrics,
    count: u32,
    job_ids: Vec<i64>,
) -> Result<()> {
    let launched = provider
        .launch(&LaunchRequest { count, job_ids })
        .await
        .inspect_err(|_| metrics.record_error("launch"))?;
    metrics.record_launch(&launched.instances, launched.spot_refused);
    if launched.spot_refused {
        tracing::warn!(errors = ?launched.errors, "spot capacity refused; on-demand asked for the rest");
    }
    for i in &launched.instances {
        tracing::info!(instance = %i.id, instance_type = %i.instance_type, capacity_type = %i.capacity_type, "instance launched");
    }
    if launched.instances.len() < count as usize {
        tracing::warn!(asked = count, got = launched.instances.len(), errors = ?launched.errors, "fewer instances than asked");
    }
    Ok(())
}

/// Logs a decision: at info when it acts, at debug when it holds.
fn log(d: &Decision) {
    let reason = d.reason.map_or("none", |r| r.as_str());
    if d.launch > 0 || !d.drain.is_empty() || !d.terminate.is_empty() {
        tracing::info!(desired = d.desired, current = d.current, reason, launch = d.launch, held = d.held, drain = ?d.drain, terminate = ?d.terminate, "scaling");
    } else if d.held > 0 {
        tracing::warn!(
            desired = d.desired,
            current = d.current,
            held = d.held,
            "instances never started a worker: launches held back"
        );
    } else {
        tracing::debug!(desired = d.desired, current = d.current, reason, "holding");
    }
}
