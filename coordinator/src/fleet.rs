//! The fleet as the coordinator sees it: what each worker says about its machine (with its
//! claims), drains asked of workers (by the scaler, `POST /v1/workers/{id}/drain`), and the one
//! answer the scaler reads each tick (`GET /v1/fleet`): jobs' pending rows and deadlines, the
//! workers with their machines and leases, and the coming scheduled runs.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nightshift_metastore::{JobFilter, JobRecord, WorkerMachine};
use nightshift_proto::wire::LeaseRequest;
use nightshift_proto::{Deadline, FleetView, InstanceInfo, JobDemand, JobState, check_text};

use crate::api_error::ApiError;
use crate::service::{MAX_GPUS_PER_WORKER, Service, check_slots, check_worker_id};

/// Drains asked of workers are read from the store at most this often per coordinator (so a
/// heartbeat costs no extra statement).
const DRAIN_REFRESH: Duration = Duration::from_secs(1);
/// A drain mark counts for workers seen within this long.
const DRAIN_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Machines remembered per coordinator (what each worker last said); past this the memory is
/// cleared and workers are written again at their next claim.
const MAX_REMEMBERED_WORKERS: usize = 100_000;
/// Longest instance id and instance type accepted.
const MAX_INSTANCE_FIELD_CHARS: usize = 64;
/// Jobs read per state for the fleet view.
const FLEET_JOBS: u32 = 1000;

/// What this coordinator remembers about the fleet between requests.
#[derive(Default)]
pub struct FleetState {
    /// Each worker's machine as last written to the store.
    machines: Mutex<HashMap<String, WorkerMachine>>,
    /// Workers marked to drain, and when that was read from the store.
    draining: Mutex<(Option<Instant>, HashSet<String>)>,
    /// Workers this coordinator told to drain (written to the store once each).
    told: Mutex<HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An instance a worker reports: short plain ids, no control characters.
fn check_instance(instance: &InstanceInfo) -> Result<(), ApiError> {
    for (field, text) in [
        ("instance.id", &instance.id),
        ("instance.instance_type", &instance.instance_type),
    ] {
        if text.is_empty() || text.chars().count() > MAX_INSTANCE_FIELD_CHARS {
            return Err(ApiError::BadRequest(format!(
                "{field} must be 1 to {MAX_INSTANCE_FIELD_CHARS} characters"
            )));
        }
        check_text(field, text)?;
    }
    Ok(())
}

/// What a lease request says about the worker's machine, checked.
fn machine_of(req: &LeaseRequest) -> Result<WorkerMachine, ApiError> {
    check_slots(req.slots)?;
    if let Some(instance) = &req.instance {
        check_instance(instance)?;
    }
    let gpus = req.gpus.unwrap_or(0);
    if gpus as usize > MAX_GPUS_PER_WORKER {
        return Err(ApiError::BadRequest(format!(
            "gpus: at most {MAX_GPUS_PER_WORKER} per worker, not {gpus}"
        )));
    }
    Ok(WorkerMachine {
        instance: req.instance.clone(),
        slots: req.slots.unwrap_or(1),
        gpus,
    })
}

impl Service {
    /// Records what a claiming worker says about its machine, when it changed since this
    /// coordinator last wrote it.
    pub(crate) async fn note_machine(&self, req: &LeaseRequest) -> Result<(), ApiError> {
        let machine = machine_of(req)?;
        if lock(&self.fleet.machines).get(&req.worker_id) == Some(&machine) {
            return Ok(());
        }
        self.store.note_machine(&req.worker_id, &machine).await?;
        let mut machines = lock(&self.fleet.machines);
        if machines.len() >= MAX_REMEMBERED_WORKERS {
            machines.clear();
        }
        machines.insert(req.worker_id.clone(), machine);
        Ok(())
    }

    /// Whether `worker` was asked to drain (read from the store at most every
    /// `DRAIN_REFRESH`, by one request while the others answer from the last read). The
    /// caller tells the worker so in its answer, and that is noted.
    pub(crate) async fn is_draining(&self, worker: &str) -> Result<bool, ApiError> {
        let refresh = {
            let mut draining = lock(&self.fleet.draining);
            let stale = draining.0.is_none_or(|at| at.elapsed() >= DRAIN_REFRESH);
            if stale {
                draining.0 = Some(Instant::now());
            }
            stale
        };
        if refresh {
            match self.store.draining_workers(DRAIN_WINDOW_MS).await {
                Ok(ids) => lock(&self.fleet.draining).1 = ids.into_iter().collect(),
                Err(e) => {
                    lock(&self.fleet.draining).0 = None;
                    return Err(e.into());
                }
            }
        }
        let draining = lock(&self.fleet.draining).1.contains(worker);
        if draining && !lock(&self.fleet.told).contains(worker) {
            self.store.drain_told(worker).await?;
            let mut told = lock(&self.fleet.told);
            if told.len() >= MAX_REMEMBERED_WORKERS {
                told.clear();
            }
            told.insert(worker.to_string());
        }
        Ok(draining)
    }

    /// Asks a worker to drain: its next claim or heartbeat tells it to finish, checkpoint,
    /// release and exit.
    pub async fn drain_worker(&self, worker: &str) -> Result<(), ApiError> {
        check_worker_id(worker)?;
        if !self.store.request_drain(worker).await? {
            return Err(ApiError::NotFound(format!(
                "no worker `{}` is known",
                nightshift_proto::excerpt(worker)
            )));
        }
        lock(&self.fleet.draining).1.insert(worker.to_string());
        tracing::info!(worker, "drain requested");
        Ok(())
    }

    /// What the scaler needs in one answer.
    pub async fn fleet_view(&self) -> Result<FleetView, ApiError> {
        let now_ms = self.store.now_ms().await?;
        let mut jobs = Vec::new();
        for state in [JobState::Queued, JobState::Running] {
            let filter = JobFilter {
                limit: FLEET_JOBS,
                state: Some(state),
                ..JobFilter::default()
            };
            for job in self.store.list_jobs(&filter).await? {
                jobs.push(self.demand(&job).await?);
            }
        }
        let mut scheduled_runs_ms: Vec<i64> = self
            .store
            .schedules()
            .await?
            .into_iter()
            .filter_map(|s| s.next_fire_at_ms)
            .collect();
        scheduled_runs_ms.sort_unstable();
        Ok(FleetView {
            now_ms,
            jobs,
            workers: self.workers().await?.workers,
            scheduled_runs_ms,
        })
    }

    async fn demand(&self, job: &JobRecord) -> Result<JobDemand, ApiError> {
        let (counts, rows_done, _) = self.store.shard_counts(job.id).await?;
        let deadline = job.spec.deadline.as_deref().map(Deadline::parse);
        Ok(JobDemand {
            job_id: job.id,
            rows_pending: job.rows_total.saturating_sub(rows_done),
            shards_open: counts.pending + counts.leased,
            // A deadline was checked at submit; one that no longer parses counts as none.
            deadline_ms: deadline
                .and_then(Result::ok)
                .map(|d| d.at_ms(job.created_at_ms)),
        })
    }
}

#[cfg(test)]
mod tests {
    use nightshift_proto::CapacityType;

    use super::*;

    fn request(
        instance: Option<InstanceInfo>,
        slots: Option<u32>,
        gpus: Option<u32>,
    ) -> LeaseRequest {
        LeaseRequest {
            worker_id: "w".into(),
            max: 1,
            instance,
            slots,
            gpus,
        }
    }

    #[test]
    fn machines_are_checked() {
        let good = InstanceInfo {
            id: "i-0123".into(),
            instance_type: "g5.xlarge".into(),
            capacity_type: CapacityType::Spot,
        };
        let m = machine_of(&request(Some(good.clone()), Some(2), Some(1))).unwrap();
        assert_eq!((m.slots, m.gpus, m.instance), (2, 1, Some(good.clone())));
        let defaults = machine_of(&request(None, None, None)).unwrap();
        assert_eq!((defaults.slots, defaults.gpus), (1, 0));
        let long = InstanceInfo {
            id: "i".repeat(MAX_INSTANCE_FIELD_CHARS + 1),
            ..good.clone()
        };
        let e = machine_of(&request(Some(long), None, None)).unwrap_err();
        assert!(e.to_string().contains("instance.id"), "{e}");
        let control = InstanceInfo {
            instance_type: "g5\u{1b}[31m".into(),
            ..good
        };
        let e = machine_of(&request(Some(control), None, None)).unwrap_err();
        assert!(e.to_string().contains("instance.instance_type"), "{e}");
        assert!(machine_of(&request(None, Some(0), None)).is_err());
        assert!(machine_of(&request(None, None, Some(1000))).is_err());
    }
}
