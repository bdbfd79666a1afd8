//! A succeeded job's garbage: its parts (a second copy of its rows) and the uploads its
//! workers left open. The finalizer collects it right after the commit; a job whose collection
//! did not happen (the coordinator died first, the store refused) stays marked in the metastore
//! (`garbage_pending`) and a later pass collects it, on any replica, or in local mode at the
//! next run of the job. The same pass forgets workers unseen for a week that hold no lease
//! (`Fleet::forget_workers`): each worker process has an id of its own, so they only pile up.

use std::time::Duration;

use nightshift_metastore::{DynMetastore, JobRecord};
use nightshift_storage::Stores;
use tokio_util::sync::CancellationToken;

use crate::finalizer::collect_garbage;
use crate::ownership::own_manifest;
use crate::service::Service;

/// How often a coordinator looks for garbage left uncollected.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A job's garbage is left to its finalizer this long after the job ended.
const LEFT_TO_FINALIZER: Duration = Duration::from_secs(60);
/// Jobs one pass collects at most.
const JOBS_PER_PASS: u32 = 100;
/// A worker unseen this long, holding no lease, is forgotten.
const WORKERS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Collects the garbage of succeeded job `job` (`names`: its manifest's files) and notes it
/// collected. Answers whether it is; if not, a later pass tries again.
pub async fn collect_succeeded(
    stores: &Stores,
    store: &DynMetastore,
    job: &JobRecord,
    names: &[String],
) -> bool {
    crash_point!("finalize-before-garbage");
    match collect_garbage(stores, &job.output_uri, &job.uid, names).await {
        Ok(g) => tracing::info!(
            job = job.id,
            objects = g.objects,
            uploads = g.uploads,
            "parts deleted, open uploads aborted"
        ),
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "collecting the job's garbage failed; a later pass tries again");
            return false;
        }
    }
    match store.garbage_collected(job.id).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(job = job.id, error = %e, "noting the job's garbage collected failed");
            false
        }
    }
}

/// Collects the garbage of succeeded jobs that ended at least `age` ago and is still pending.
/// Answers how many jobs' garbage it collected.
pub async fn collect_pending(stores: &Stores, store: &DynMetastore, age: Duration) -> usize {
    let jobs = match store
        .garbage_pending(age.as_millis() as i64, JOBS_PER_PASS)
        .await
    {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(error = %e, "reading jobs with garbage pending failed");
            return 0;
        }
    };
    let mut collected = 0;
    for job in &jobs {
        let names = manifest_names(stores, job).await;
        collected += usize::from(collect_succeeded(stores, store, job, &names).await);
    }
    collected
}

/// The files `job`'s manifest lists, when the manifest at its output is its own; else none.
async fn manifest_names(stores: &Stores, job: &JobRecord) -> Vec<String> {
    let Ok(out) = stores.locate(&job.output_uri) else {
        return Vec::new();
    };
    match own_manifest(&out, &job.uid).await {
        Ok(Some(m)) => (m.files.iter().chain(&m.error_files))
            .map(|f| f.path.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// Collects garbage left uncollected and forgets workers long gone, every `SWEEP_EVERY`,
/// until `shutdown`.
pub async fn collector(service: Service, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let n = collect_pending(&service.stores, &service.store, LEFT_TO_FINALIZER).await;
        if n > 0 {
            tracing::info!(jobs = n, "garbage left uncollected is collected");
        }
        match service
            .store
            .forget_workers(WORKERS_KEPT.as_millis() as i64)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(workers = n, "workers unseen for a week forgotten"),
            Err(e) => tracing::warn!(error = %e, "forgetting workers long unseen failed"),
        }
    }
}
