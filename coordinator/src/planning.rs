//! Planning in the background. An input of more files than `submit` plans before it answers
//! (`INLINE_PLAN_FILES`) is checked on one file and the job is recorded as planning; this
//! loop then lists the input, reads its footers in pieces of `PIECE_FILES` (at most
//! `FOOTER_CONCURRENCY` at once) and records each piece's files and shards as soon as they
//! are cut (`Jobs::append_plan`), so workers lease the first shards while the rest is
//! planned. An object store's listing is read a page at a time as planning goes (it comes in
//! key order), so the coordinator holds two pieces of it; a local directory, which lists in
//! no order, is read whole and sorted first.
//! A problem fails the job with the message `submit` would have given. A coordinator that
//! stops mid-plan, or a retried job, plans on from the files recorded. One replica plans a job
//! at a time: it claims the job before it lists the input and renews the claim before each
//! piece (`Jobs::claim_planning`); the others skip the job until the claim expires.

use std::collections::HashMap;
use std::time::Duration;

use futures::TryStreamExt;
use futures::stream::{BoxStream, TryChunks};
use nightshift_metastore::{JobRecord, PlanPiece, StoreError};
use nightshift_proto::FailureClass;
use nightshift_proto::wire::JobPlan;
use nightshift_storage::input_listing::{InputStream, stream_inputs};
use nightshift_storage::location::{is_local_uri, resolve_links};
use nightshift_storage::{InputObject, StorageError};
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
/// How long a replica's claim to plan a job lasts; it is renewed before each piece. A piece
/// that takes longer lets another replica take the job over (the store still records each
/// piece once).
const PLAN_CLAIM: Duration = Duration::from_secs(15);

/// How planning a job here ended, short of an error.
#[derive(Debug, PartialEq, Eq)]
enum Planned {
    /// The last piece is recorded.
    Complete,
    /// The job stopped planning meanwhile (cancelled, failed, deleted), or another replica
    /// that took over an expired claim recorded the piece first.
    Stopped,
    /// Another replica holds the claim.
    Elsewhere,
}

/// Why a job's planning stopped before its end.
#[derive(Debug, thiserror::Error)]
enum PlanningError {
    /// The store failed: the job stays planning and is taken up again.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The object store failed in a way worth another try: the job stays planning and is
    /// taken up again.
    #[error(transparent)]
    Storage(StorageError),
    /// What `submit` would have refused the job for: the job fails with it.
    #[error("{0}")]
    Refused(String),
}

impl From<JobCheckError> for PlanningError {
    fn from(e: JobCheckError) -> Self {
        match e {
            JobCheckError::Input(e) | JobCheckError::Model(e)
                if e.class() == FailureClass::Retryable =>
            {
                PlanningError::Storage(e)
            }
            e => PlanningError::Refused(ApiError::Check(e).to_string()),
        }
    }
}

/// Plans every job that is planning and that no other replica plans, each in its own task,
/// until `shutdown`; `owner` names this replica's claims.
pub async fn planning_loop(service: Service, owner: String, shutdown: CancellationToken) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut planning: HashMap<tokio::task::Id, i64> = HashMap::new();
    loop {
        match service.store.planning_jobs().await {
            Ok(jobs) => {
                for job in jobs {
                    if !planning.values().any(|&id| id == job.id) {
                        let id = job.id;
                        let task = tasks.spawn(plan_job(service.clone(), owner.clone(), job));
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
async fn plan_job(service: Service, owner: String, job: JobRecord) {
    match plan_rest(&service, &owner, &job).await {
        Ok(Planned::Complete) => {
            tracing::info!(job = job.id, "planning done");
            // Its last merge and its commit need not wait for the finalizer's next tick.
            service.shard_done.notify_one();
        }
        Ok(Planned::Stopped) => {
            tracing::info!(
                job = job.id,
                "planning stopped: the job ended, or another replica recorded the piece"
            );
        }
        Ok(Planned::Elsewhere) => tracing::debug!(job = job.id, "another replica plans the job"),
        Err(PlanningError::Store(e)) => {
            tracing::warn!(job = job.id, error = %e, "planning paused: the store failed");
        }
        Err(PlanningError::Storage(e)) => {
            tracing::warn!(job = job.id, error = %e, "planning paused: the object store failed");
        }
        Err(PlanningError::Refused(message)) => {
            tracing::warn!(job = job.id, error = %message, "planning failed the job");
            if let Err(e) = service.store.fail_planning(job.id, &message).await {
                tracing::warn!(job = job.id, error = %e, "failing the job failed");
            }
        }
    }
}

/// Lists the job's input and records it piece by piece from the files recorded on, while this
/// replica holds the job's claim.
async fn plan_rest(
    service: &Service,
    owner: &str,
    job: &JobRecord,
) -> Result<Planned, PlanningError> {
    let claim = || {
        service
            .store
            .claim_planning(job.id, owner, millis(PLAN_CLAIM))
    };
    if !claim().await? {
        return Ok(Planned::Elsewhere);
    }
    let spec = &job.spec;
    let mut planner = Planner::new(&service.stores, spec).await?;
    let InputStream {
        objects: mut listing,
        total,
    } = stream_inputs(&service.stores, &spec.input.uri)
        .await
        .map_err(JobCheckError::Input)?;
    if job.files_planned > 0 {
        skip_recorded(service, job, &mut listing, &mut planner).await?;
    }
    let mut pieces = listing.try_chunks(PIECE_FILES);
    let (mut after, mut rows) = (job.files_planned, job.rows_total);
    let mut piece = next_piece(&mut pieces).await?;
    loop {
        // One piece ahead: the last piece is the one after which the listing ends.
        let next = match piece.is_empty() {
            true => Vec::new(),
            false => next_piece(&mut pieces).await?,
        };
        let last = next.is_empty();
        slow_down().await;
        if !claim().await? {
            return Ok(Planned::Elsewhere);
        }
        let plan = plan_piece(service, &mut planner, &piece, after).await?;
        rows += plan.rows_total;
        if last && rows == 0 {
            let uri = spec.input.uri.clone();
            return Err(JobCheckError::EmptyInput { uri }.into());
        }
        let files = piece.len() as u64;
        let recorded = PlanPiece {
            after,
            plan,
            listed: if last { Some(after + files) } else { total },
            last,
        };
        if !service.store.append_plan(job.id, &recorded).await? {
            return Ok(Planned::Stopped);
        }
        if last {
            return Ok(Planned::Complete);
        }
        after += files;
        piece = next;
    }
}

/// The listing, a piece at a time.
type Pieces = TryChunks<BoxStream<'static, Result<InputObject, StorageError>>>;

/// The next piece of the listing (empty once it has ended).
async fn next_piece(pieces: &mut Pieces) -> Result<Vec<InputObject>, PlanningError> {
    match pieces.try_next().await {
        Ok(piece) => Ok(piece.unwrap_or_default()),
        Err(e) => Err(JobCheckError::Input(e.1).into()),
    }
}

/// One piece's files checked against the allow-list and planned (numbered from `after`).
async fn plan_piece(
    service: &Service,
    planner: &mut Planner<'_>,
    piece: &[InputObject],
    after: u64,
) -> Result<JobPlan, PlanningError> {
    for uri in piece.iter().map(|o| o.location.uri()) {
        if is_local_uri(&uri) {
            service
                .allowed("input.uri", &resolve_links(&uri))
                .map_err(|e| PlanningError::Refused(e.to_string()))?;
        }
    }
    if piece.is_empty() {
        return Ok(JobPlan::default());
    }
    Ok(planner.plan(piece, file_index(after)?).await?)
}

/// Takes the files already recorded off the listing, which must still begin with them, so
/// that planning goes on where it stopped; the first of them sets the output's types again.
async fn skip_recorded(
    service: &Service,
    job: &JobRecord,
    listing: &mut BoxStream<'static, Result<InputObject, StorageError>>,
    planner: &mut Planner<'_>,
) -> Result<(), PlanningError> {
    let changed = || {
        PlanningError::Refused(format!(
            "input `{}` changed while the job was planned: its first {} files are no longer \
             the ones planned; submit the job again",
            job.spec.input.uri, job.files_planned
        ))
    };
    let mut first = None;
    for recorded in service.store.input_files(job.id).await? {
        match listing.try_next().await.map_err(JobCheckError::Input)? {
            Some(o) if o.location.uri() == recorded.uri => {
                first.get_or_insert(o);
            }
            _ => return Err(changed()),
        }
    }
    let first = first.ok_or_else(changed)?;
    planner.plan(std::slice::from_ref(&first), 0).await?;
    Ok(())
}

/// A duration in ms, as the store's claims take it.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
