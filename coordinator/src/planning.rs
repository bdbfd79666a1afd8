//! Planning in the background. An input of more files than `submit` plans before it answers
//! (`INLINE_PLAN_FILES`) is checked on one file and the job is recorded as planning; this
//! loop then lists the input, reads its footers in pieces of `PIECE_FILES` (at most
//! `FOOTER_CONCURRENCY` at once) and records each piece's files and shards as soon as they
//! are cut (`Metastore::append_plan`), so workers lease the first shards while the rest is
//! planned, and the coordinator holds the listing but never more than one piece's footers.
//! A problem fails the job with the message `submit` would have given. A coordinator that
//! stops mid-plan, or a retried job, plans on from the files recorded.

use std::collections::HashMap;
use std::time::Duration;

use nightshift_metastore::{JobRecord, PlanPiece, StoreError};
use nightshift_proto::wire::JobPlan;
use nightshift_storage::location::{is_local_uri, resolve_links};
use nightshift_storage::{InputObject, list_inputs};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api_error::ApiError;
use crate::job_check::{JobCheckError, Planner};
use crate::service::Service;

/// Input files whose footers are read, and whose shards are recorded, together.
const PIECE_FILES: usize = 256;
/// How often the loop looks for jobs to plan besides being woken (jobs a retry, another
/// replica or a coordinator that stopped left planning).
const PLANNING_TICK: Duration = Duration::from_secs(2);

/// Why a job's planning stopped before its end.
#[derive(Debug, thiserror::Error)]
enum PlanningError {
    /// The store failed: the job stays planning and is taken up again.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// What `submit` would have refused the job for: the job fails with it.
    #[error("{0}")]
    Refused(String),
}

impl From<JobCheckError> for PlanningError {
    fn from(e: JobCheckError) -> Self {
        PlanningError::Refused(ApiError::Check(e).to_string())
    }
}

/// Plans every job that is planning, each in its own task, until `shutdown`.
pub async fn planning_loop(service: Service, shutdown: CancellationToken) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut planning: HashMap<tokio::task::Id, i64> = HashMap::new();
    loop {
        match service.store.planning_jobs().await {
            Ok(jobs) => {
                for job in jobs {
                    if !planning.values().any(|&id| id == job.id) {
                        let id = job.id;
                        let task = tasks.spawn(plan_job(service.clone(), job));
                        planning.insert(task.id(), id);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the jobs to plan failed"),
        }
        let tick = tokio::time::sleep(PLANNING_TICK);
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    tasks.shutdown().await;
                    return;
                }
                _ = &mut tick => break,
                _ = service.plan_wanted.notified() => break,
                Some(ended) = tasks.join_next_with_id() => {
                    let task = ended.map(|(task, ())| task).unwrap_or_else(|e| e.id());
                    planning.remove(&task);
                }
            }
        }
    }
}

/// Plans one job to its end, or until it stops being planned here.
async fn plan_job(service: Service, job: JobRecord) {
    match plan_rest(&service, &job).await {
        Ok(true) => {
            tracing::info!(job = job.id, "planning done");
            // Its last merge and its commit need not wait for the finalizer's next tick.
            service.shard_done.notify_one();
        }
        Ok(false) => tracing::info!(job = job.id, "planning stopped: the job is not planning"),
        Err(PlanningError::Store(e)) => {
            tracing::warn!(job = job.id, error = %e, "planning paused: the store failed");
        }
        Err(PlanningError::Refused(message)) => {
            tracing::warn!(job = job.id, error = %message, "planning failed the job");
            if let Err(e) = service.store.fail_planning(job.id, &message).await {
                tracing::warn!(job = job.id, error = %e, "failing the job failed");
            }
        }
    }
}

/// Lists the job's input and records it piece by piece from the files recorded on; answers
/// whether the plan is complete (false: the job stopped planning meanwhile).
async fn plan_rest(service: &Service, job: &JobRecord) -> Result<bool, PlanningError> {
    let spec = &job.spec;
    let mut planner = Planner::new(&service.stores, spec).await?;
    let objects = list_inputs(&service.stores, &spec.input.uri)
        .await
        .map_err(JobCheckError::Input)?;
    let mut after = job.files_planned;
    if after > 0 {
        check_unchanged(service, job, &objects).await?;
        // The files still to plan must agree with the first one.
        planner.plan(&objects[..1], 0).await?;
    }
    let listed = objects.len() as u64;
    let mut rows = job.rows_total;
    let rest = &objects[after as usize..];
    // An input that lost files since its last piece still ends, with an empty piece.
    let pieces: Vec<&[InputObject]> = match rest.is_empty() {
        true => vec![&[]],
        false => rest.chunks(PIECE_FILES).collect(),
    };
    for piece in pieces {
        slow_down().await;
        for uri in piece.iter().map(|o| o.location.uri()) {
            if is_local_uri(&uri) {
                service
                    .allowed("input.uri", &resolve_links(&uri))
                    .map_err(|e| PlanningError::Refused(e.to_string()))?;
            }
        }
        let plan = match piece.is_empty() {
            true => JobPlan::default(),
            false => planner.plan(piece, file_index(after)?).await?,
        };
        let last = after + piece.len() as u64 == listed;
        rows += plan.rows_total;
        if last && rows == 0 {
            return Err(JobCheckError::EmptyInput {
                uri: spec.input.uri.clone(),
            }
            .into());
        }
        let recorded = PlanPiece {
            after,
            plan,
            listed,
            last,
        };
        if !service.store.append_plan(job.id, &recorded).await? {
            return Ok(false);
        }
        after += piece.len() as u64;
    }
    Ok(true)
}

/// The listing still begins with the files recorded: planning goes on where it stopped.
async fn check_unchanged(
    service: &Service,
    job: &JobRecord,
    objects: &[InputObject],
) -> Result<(), PlanningError> {
    let recorded = service.store.input_files(job.id).await?;
    let listed: Vec<String> = objects
        .iter()
        .take(recorded.len())
        .map(|o| o.location.uri())
        .collect();
    let unchanged = listed.len() == recorded.len()
        && listed.iter().zip(&recorded).all(|(uri, f)| *uri == f.uri);
    match unchanged {
        true => Ok(()),
        false => Err(PlanningError::Refused(format!(
            "input `{}` changed while the job was planned: its first {} files are no longer \
             the ones planned; submit the job again",
            job.spec.input.uri,
            recorded.len()
        ))),
    }
}

/// The index of an input file, as shards record it.
fn file_index(n: u64) -> Result<u32, PlanningError> {
    u32::try_from(n)
        .map_err(|_| PlanningError::Refused(format!("more than {} input files", u32::MAX)))
}

/// A slow listing, when the `plan-piece-delay` failpoint returns a number of milliseconds
/// (`plan-piece-delay=return(300)`): tests that watch a job while it is planned.
#[cfg(feature = "failpoints")]
async fn slow_down() {
    let delay = fail::eval("plan-piece-delay", |ms| {
        ms.and_then(|m| m.parse::<u64>().ok())
    });
    if let Some(ms) = delay.flatten() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "failpoints"))]
async fn slow_down() {}
