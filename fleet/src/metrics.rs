//! The scaler's own `/metrics` (Prometheus text) and `/healthz`: its last decision, the
//! instances it sees, and counts of what it did and why.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use nightshift_proto::CapacityType;
use tokio_util::sync::CancellationToken;

use crate::decide::Decision;
use crate::provider::Instance;

pub const DESIRED: &str = "nightshift_scaler_desired_workers";
pub const CURRENT: &str = "nightshift_scaler_current_workers";
/// Instances wanted but held back after instances never started a worker.
pub const HELD: &str = "nightshift_scaler_launches_held";
pub const INSTANCES: &str = "nightshift_scaler_instances";
pub const DECISIONS: &str = "nightshift_scaler_decisions_total";
pub const LAUNCHED: &str = "nightshift_scaler_launched_total";
pub const DRAINS: &str = "nightshift_scaler_drains_total";
pub const TERMINATED: &str = "nightshift_scaler_terminated_total";
pub const SPOT_REFUSALS: &str = "nightshift_scaler_spot_refusals_total";
pub const ERRORS: &str = "nightshift_scaler_errors_total";

#[derive(Default)]
struct State {
    desired: u32,
    current: u32,
    held: u32,
    instances: BTreeMap<&'static str, u64>,
    /// `(metric, label name, label value)` -> count (no label when its name is empty).
    counters: BTreeMap<(&'static str, &'static str, String), u64>,
}

/// What `/metrics` shows; shared by the loop (which records) and the server (which renders).
#[derive(Clone, Default)]
pub struct ScalerMetrics(Arc<Mutex<State>>);

impl ScalerMetrics {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, metric: &'static str, label: &'static str, value: &str, n: u64) {
        *self
            .state()
            .counters
            .entry((metric, label, value.to_string()))
            .or_default() += n;
    }

    pub fn record_decision(&self, decision: &Decision, instances: &[Instance]) {
        let reason = decision.reason.map_or("none", |r| r.as_str());
        self.count(DECISIONS, "reason", reason, 1);
        let mut state = self.state();
        state.desired = decision.desired;
        state.current = decision.current;
        state.held = decision.held;
        state.instances.clear();
        for kind in [CapacityType::Spot, CapacityType::OnDemand] {
            let n = instances.iter().filter(|i| i.capacity_type == kind).count();
            state.instances.insert(kind.as_str(), n as u64);
        }
    }

    pub fn record_launch(&self, launched: &[Instance], spot_refused: bool) {
        for i in launched {
            self.count(LAUNCHED, "capacity_type", i.capacity_type.as_str(), 1);
        }
        if spot_refused {
            self.count(SPOT_REFUSALS, "", "", 1);
        }
    }

    pub fn record_drain(&self) {
        self.count(DRAINS, "", "", 1);
    }

    pub fn record_terminated(&self, reason: &str) {
        self.count(TERMINATED, "reason", reason, 1);
    }

    pub fn record_error(&self, step: &str) {
        self.count(ERRORS, "step", step, 1);
    }

    pub fn render(&self) -> String {
        let state = self.state();
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE {DESIRED} gauge\n{DESIRED} {}", state.desired);
        let _ = writeln!(out, "# TYPE {CURRENT} gauge\n{CURRENT} {}", state.current);
        let _ = writeln!(out, "# TYPE {HELD} gauge\n{HELD} {}", state.held);
        let _ = writeln!(out, "# TYPE {INSTANCES} gauge");
        for (kind, n) in &state.instances {
            let _ = writeln!(out, "{INSTANCES}{{capacity_type=\"{kind}\"}} {n}");
        }
        let mut typed = std::collections::BTreeSet::new();
        for ((metric, label, value), n) in &state.counters {
            if typed.insert(*metric) {
                let _ = writeln!(out, "# TYPE {metric} counter");
            }
            if label.is_empty() {
                let _ = writeln!(out, "{metric} {n}");
            } else {
                let _ = writeln!(out, "{metric}{{{label}=\"{value}\"}} {n}");
            }
        }
        out
    }

    /// Serves `/metrics` and `/healthz` on `listen` until `shutdown`.
    pub async fn serve(
        self,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(move || async move { self.render() }));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}
