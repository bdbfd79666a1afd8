//! The coordinator's background loops. Each is safe to run on several replicas at once: the
//! store's statements skip rows another replica holds, and finalizing is claimed per job and
//! idempotent.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::finalizer::{Claim, FinalizeError, finalize};
use crate::garbage::collect_succeeded;
use crate::service::Service;
use nightshift_metastore::JobOutcome;
use nightshift_metastore::merges::plan_groups_for;

/// Expired leases go back to the queue (or dead past max attempts).
pub async fn reaper(service: Service, every: Duration, shutdown: CancellationToken) {
    loop {
        match service.store.reap_expired(service.timing).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(shards = n, "expired leases returned to the queue"),
            Err(e) => tracing::warn!(error = %e, "reaper pass failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `output.target_file_mb` is in MiB.
const BYTES_PER_MB: u64 = 1024 * 1024;

/// How long a job whose commit failed for a retryable reason waits before any replica takes
/// it again; meanwhile the finalizer serves other jobs.
pub const COMMIT_RETRY_BACKOFF: Duration = Duration::from_secs(5);

/// Passes a completion may wake per finalizer tick at most (the load harness at 1,000
/// workers: one woken per completion took 3 ms of PostgreSQL each, 9 a second).
const WOKEN_PASSES_PER_TICK: u32 = 2;

/// Moves finished jobs on (to finalizing or failed) and commits finalizing ones.
pub async fn finalizer(
    service: Service,
    replica: String,
    every: Duration,
    claim_ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let began = tokio::time::Instant::now();
        // A copy that won makes its original done: before merges are planned.
        match service.store.resolve_copies().await {
            Ok(outcome) => {
                if outcome.won + outcome.dropped > 0 {
                    service.leases_ended();
                }
                service.metrics.copies_resolved(outcome);
            }
            Err(e) => tracing::warn!(error = %e, "deciding speculative copies failed"),
        }
        match plan_merges(&service).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(merges = n, "merge work queued"),
            Err(e) => tracing::warn!(error = %e, "planning merges failed"),
        }
        if let Err(e) = service.store.settle_jobs().await {
            tracing::warn!(error = %e, "settling jobs failed");
        }
        start_queued(&service).await;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match service
                .store
                .claim_finalize(&replica, claim_ttl.as_millis() as i64)
                .await
            {
                Ok(Some(job)) => {
                    let span = tracing::info_span!("finalize", job = job.id);
                    let id = job.id;
                    // Renew the claim while committing, so a replica that dies mid-commit
                    // holds the job for one claim TTL at most.
                    let renewing = CancellationToken::new();
                    let renewer = tokio::spawn(renew_claim(
                        service.clone(),
                        id,
                        replica.clone(),
                        claim_ttl,
                        renewing.clone(),
                    ));
                    let committed = commit(&service, &replica, claim_ttl, job)
                        .instrument(span)
                        .await;
                    renewing.cancel();
                    let _ = renewer.await;
                    if !committed {
                        // Keep it through a backoff: the next passes serve other jobs first,
                        // then any replica tries this one again.
                        let backoff = COMMIT_RETRY_BACKOFF.as_millis() as i64;
                        let _ = service.store.extend_finalize(id, &replica, backoff).await;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a job to finalize failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = service.shard_done.notified() => {
                // Completions come in bursts at scale: one pass serves all of a burst.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(began + every / WOKEN_PASSES_PER_TICK) => {}
                }
            }
        }
    }
}

/// Queues merge work for the committed parts of every running job (`merges.rs`), so that
/// workers make the output files while the job runs; answers how many merges were queued.
async fn plan_merges(service: &Service) -> Result<u64, nightshift_metastore::StoreError> {
    let mut made = 0;
    for job in service.store.running_jobs().await? {
        let candidates = service.store.merge_candidates(job.id).await?;
        let target = job.spec.output.target_file_mb.saturating_mul(BYTES_PER_MB);
        let groups = plan_groups_for(&candidates, target, !job.planning);
        if !groups.is_empty() {
            made += service.store.create_merges(job.id, &groups).await?;
        }
    }
    Ok(made)
}

/// Keeps a finalize claim alive every third of its TTL until `stop`.
async fn renew_claim(
    service: Service,
    job: i64,
    replica: String,
    ttl: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        match service
            .store
            .extend_finalize(job, &replica, ttl.as_millis() as i64)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(job, error = %e, "renewing the finalize claim failed"),
        }
    }
}

/// Commits one job; false when it should be tried again later.
async fn commit(
    service: &Service,
    replica: &str,
    claim_ttl: Duration,
    job: nightshift_metastore::JobRecord,
) -> bool {
    let started = std::time::Instant::now();
    let parts = match service.store.merged_parts(job.id).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "reading parts failed; will retry");
            return false;
        }
    };
    let inputs = match service.store.input_files(job.id).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "reading inputs failed; will retry");
            return false;
        }
    };
    let cost = match service.job_cost(&job, job.rows_total).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "reading the job's cost failed; will retry");
            return false;
        }
    };
    let claim = Claim {
        store: &service.store,
        job: job.id,
        owner: replica,
        ttl_ms: claim_ttl.as_millis() as i64,
    };
    let mut names = Vec::new();
    let outcome = match finalize(&service.stores, &job, &parts, inputs, cost, &claim).await {
        Ok(c) => {
            let files = c.manifest.files.iter().chain(&c.manifest.error_files);
            names = files.map(|f| f.path.clone()).collect();
            tracing::info!(
                job = job.id,
                files = c.manifest.files.len(),
                rows = c.manifest.total_rows,
                error_rows = c.manifest.error_rows,
                "job committed"
            );
            JobOutcome::Succeeded
        }
        Err(FinalizeError::ClaimLost) => {
            tracing::info!(
                job = job.id,
                "job no longer ours to commit (cancelled or taken)"
            );
            // Cancelled after its manifest was published: it goes.
            service.unpublish_if_cancelled(job.id).await;
            return true;
        }
        Err(e) if e.is_retryable() => {
            tracing::warn!(job = job.id, error = %e, "finalizing failed; will retry");
            return false;
        }
        Err(e) => {
            tracing::error!(job = job.id, error = %e, "finalizing failed for good");
            JobOutcome::Failed(format!("commit failed: {e}"))
        }
    };
    let succeeded = matches!(outcome, JobOutcome::Succeeded);
    if let Err(e) = service.store.finish_job(job.id, replica, outcome).await {
        tracing::warn!(job = job.id, error = %e, "recording the commit failed");
        // Cancelled after its `_SUCCESS` was published: it goes.
        service.unpublish_if_cancelled(job.id).await;
        return false;
    }
    if succeeded {
        service.metrics.commits.observe(started.elapsed());
        collect_succeeded(&service.stores, &service.store, &job, &names).await;
        service.collect_released_parts(&job).await;
    }
    true
}

/// With `--max-running-jobs`, queued jobs start as running ones end (or are cancelled).
async fn start_queued(service: &Service) {
    let Some(max) = service.max_running_jobs else {
        return;
    };
    match service.store.start_queued(max).await {
        Ok(started) if started.is_empty() => {}
        Ok(started) => tracing::info!(jobs = ?started, "queued jobs started"),
        Err(e) => tracing::warn!(error = %e, "starting queued jobs failed"),
    }
}
