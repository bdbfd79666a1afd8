//! What the fleet scaler reads from a coordinator (`GET /v1/fleet`) and what workers say about
//! the machine they run on, for the scaler and for each job's cost report.

use serde::{Deserialize, Serialize};

use crate::wire::WorkerView;

/// How an instance is bought: spot (reclaimable, cheaper) or on demand.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    Spot,
    OnDemand,
}

impl CapacityType {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on-demand",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spot" => Some(CapacityType::Spot),
            "on-demand" => Some(CapacityType::OnDemand),
            _ => None,
        }
    }
}

impl std::fmt::Display for CapacityType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The machine a worker runs on, as the worker reports it with its claims (from its flags or
/// the instance metadata service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceInfo {
    /// The cloud's instance id (`i-...` on EC2).
    pub id: String,
    /// The instance type (`g5.xlarge`), the key of the coordinator's price table.
    pub instance_type: String,
    pub capacity_type: CapacityType,
}

/// Work a job still has, as the scaler sizes the fleet by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDemand {
    pub job_id: i64,
    /// Rows not yet checkpointed (planned rows minus rows done).
    pub rows_pending: u64,
    /// Shards pending or leased: more workers than this (per slot) cannot help the job.
    pub shards_open: u64,
    /// When the job should be done (ms since the epoch), from its spec's `deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// `GET /v1/fleet`: the queue, the workers and the coming scheduled runs, in one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FleetView {
    /// The coordinator's clock (ms since the epoch) when it answered.
    pub now_ms: i64,
    /// Jobs queued, planning or running.
    pub jobs: Vec<JobDemand>,
    pub workers: Vec<WorkerView>,
    /// The next run of each active schedule (ms since the epoch), soonest first.
    pub scheduled_runs_ms: Vec<i64>,
}

/// The API path that asks a worker to drain (`POST`). A worker names itself (`--worker-id`)
/// with any printable text, `/`, `?`, `#` and spaces included, so its id goes escaped as one
/// path segment; the coordinator's router decodes it back.
pub fn drain_path(worker: &str) -> String {
    let id = percent_encoding::utf8_percent_encode(worker, percent_encoding::NON_ALPHANUMERIC);
    format!("/v1/workers/{id}/drain")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_id_is_one_escaped_path_segment() {
        assert_eq!(drain_path("w1"), "/v1/workers/w1/drain");
        assert_eq!(
            drain_path("gpu box/1?a#b%"),
            "/v1/workers/gpu%20box%2F1%3Fa%23b%25/drain"
        );
        assert_eq!(drain_path("é"), "/v1/workers/%C3%A9/drain");
    }
}
