//! What the coordinator does for people, services and workers, independent of HTTP: submit
//! (check the allow-list, validate, plan, insert atomically), inspect, cancel, retry, and the
//! worker's lease operations. The API and local mode both call these.

use std::sync::Arc;
use std::time::Instant;

use nightshift_proto::wire::{
    HeartbeatResponse, JobView, LeaseRef, LeaseResponse, PartRecord, ShardLease, SubmitResponse,
};
use nightshift_proto::{FailureClass, JobSpec};
use nightshift_storage::Stores;
use nightshift_storage::location::{absolutize, is_local_uri};
use tokio_util::sync::CancellationToken;

use crate::allow_list::AllowList;
use crate::api_error::ApiError;
use crate::coalescer::{Coalescer, Limits};
use crate::job_check::check_and_plan;
use crate::metrics::Metrics;
use crate::store::{ClaimRequest, DynStore, JobRecord, LeaseTiming, NewJob, StoreError, Submitted};

/// The most shards one lease request may take.
pub const MAX_LEASE_BATCH: u32 = 256;

/// Claims in flight at once when coalescing, and shards per claim call.
const CLAIM_LIMITS: Limits = Limits {
    rounds: 4,
    weight: 1024,
};
/// Completion calls in flight at once when coalescing, and shards per call.
const COMPLETE_LIMITS: Limits = Limits {
    rounds: 4,
    weight: 1024,
};

#[derive(Clone)]
pub struct Service {
    pub store: DynStore,
    pub stores: Arc<Stores>,
    pub allow: AllowList,
    pub timing: LeaseTiming,
    pub metrics: Arc<Metrics>,
    /// Set by `coalescing`: concurrent claims and completions share store calls.
    coalesced: Option<Coalesced>,
}

#[derive(Clone)]
struct Coalesced {
    claims: Coalescer<ClaimRequest, Vec<ShardLease>>,
    completions: Coalescer<LeaseRef, ()>,
}

impl Service {
    pub fn new(
        store: DynStore,
        stores: Arc<Stores>,
        allow: AllowList,
        timing: LeaseTiming,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            stores,
            allow,
            timing,
            metrics,
            coalesced: None,
        }
    }

    /// This service with concurrent claims and completions coalesced into `claim_many` and
    /// `complete_many` calls (see `coalescer`), until `shutdown`.
    pub fn coalescing(mut self, shutdown: CancellationToken) -> Self {
        let (store, timing) = (self.store.clone(), self.timing);
        let claims = Coalescer::start(
            CLAIM_LIMITS,
            Arc::new(move |requests: Vec<ClaimRequest>| {
                let store = store.clone();
                Box::pin(async move { store.claim_many(&requests, timing).await })
            }),
            shutdown.clone(),
        );
        let store = self.store.clone();
        let completions = Coalescer::start(
            COMPLETE_LIMITS,
            Arc::new(move |leases: Vec<LeaseRef>| {
                let store = store.clone();
                Box::pin(async move { store.complete_many(&leases).await })
            }),
            shutdown,
        );
        self.coalesced = Some(Coalesced {
            claims,
            completions,
        });
        self
    }

    /// Submits a job. With an idempotency key, the same key and spec return the existing job
    /// (created: false); the same key with another spec is a conflict.
    pub async fn submit(
        &self,
        mut spec: JobSpec,
        key: Option<String>,
    ) -> Result<SubmitResponse, ApiError> {
        spec.check().map_err(ApiError::Spec)?;
        for (field, uri) in [
            ("input.uri", &mut spec.input.uri),
            ("model.uri", &mut spec.model.uri),
            ("output.uri", &mut spec.output.uri),
        ] {
            if is_local_uri(uri) {
                if !uri.trim_start_matches("file://").starts_with('/') {
                    return Err(ApiError::UriNotAllowed {
                        key: field,
                        uri: uri.clone(),
                        reason: "local paths in a submitted spec must be absolute".into(),
                    });
                }
                *uri = absolutize(uri);
            }
            if let Some(reason) = self.allow.refusal(uri.trim_end_matches('/')) {
                return Err(ApiError::UriNotAllowed {
                    key: field,
                    uri: uri.clone(),
                    reason,
                });
            }
        }
        if let Some(k) = &key {
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::BadRequest(
                    "Idempotency-Key must be 1 to 200 characters".into(),
                ));
            }
            if let Some(existing) = self.store.job_by_key(k).await? {
                return if existing.spec_hash == spec.hash() {
                    Ok(SubmitResponse {
                        created: false,
                        job: self.view(&existing).await?,
                    })
                } else {
                    Err(ApiError::Store(StoreError::IdempotencyConflict {
                        key: k.clone(),
                        job_id: existing.id,
                    }))
                };
            }
        }
        let checked = check_and_plan(&self.stores, &spec)
            .await
            .map_err(ApiError::Check)?;
        let submitted = self
            .store
            .create_job(NewJob {
                uid: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
                spec,
                idempotency_key: key,
                plan: checked.plan,
            })
            .await?;
        let created = matches!(submitted, Submitted::Created(_));
        let job = self.view(submitted.job()).await?;
        if created {
            tracing::info!(job = job.id, name = %job.name, rows = job.rows_total, shards = job.shards.total(), "job submitted");
        }
        Ok(SubmitResponse { created, job })
    }

    pub async fn view(&self, job: &JobRecord) -> Result<JobView, ApiError> {
        let (counts, done, errors) = self.store.shard_counts(job.id).await?;
        let now = self.store.now_ms().await?;
        Ok(job.view(counts, done, errors, now))
    }

    /// A job by numeric id or, failing that, the newest job of that name.
    pub async fn find(&self, id_or_name: &str) -> Result<JobRecord, ApiError> {
        let found = match id_or_name.parse::<i64>() {
            Ok(id) => self.store.job(id).await?,
            Err(_) => self.store.job_by_name(id_or_name).await?,
        };
        found.ok_or_else(|| ApiError::NotFound(format!("no job `{id_or_name}`")))
    }

    pub async fn get(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        self.view(&job).await
    }

    pub async fn list(&self, limit: u32) -> Result<Vec<JobView>, ApiError> {
        let jobs = self.store.list_jobs(limit.clamp(1, 1000)).await?;
        let mut views = Vec::with_capacity(jobs.len());
        for j in &jobs {
            views.push(self.view(j).await?);
        }
        Ok(views)
    }

    pub async fn cancel(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        let job = self.store.cancel_job(job.id).await?;
        tracing::info!(job = job.id, "job cancelled");
        self.view(&job).await
    }

    pub async fn retry(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        let job = self.store.retry_job(job.id).await?;
        tracing::info!(job = job.id, "job retried");
        self.view(&job).await
    }

    // Worker operations.

    pub async fn lease(&self, worker: &str, max: u32) -> Result<LeaseResponse, ApiError> {
        if worker.is_empty() || worker.len() > 200 {
            return Err(ApiError::BadRequest(
                "worker_id must be 1 to 200 characters".into(),
            ));
        }
        let started = Instant::now();
        let request = ClaimRequest {
            worker: worker.to_string(),
            max: max.clamp(1, MAX_LEASE_BATCH),
        };
        let coalesced = match &self.coalesced {
            Some(c) => c.claims.call(request.clone(), request.max as usize).await,
            None => None,
        };
        let leases = match coalesced {
            Some(answer) => answer?,
            None => {
                self.store
                    .claim(&request.worker, request.max, self.timing)
                    .await?
            }
        };
        self.metrics.lease_claims.observe(started.elapsed());
        Ok(LeaseResponse {
            leases,
            lease_ttl_ms: self.timing.ttl_ms as u64,
        })
    }

    pub async fn heartbeat(
        &self,
        worker: &str,
        leases: &[LeaseRef],
    ) -> Result<HeartbeatResponse, ApiError> {
        Ok(self.store.heartbeat(worker, leases, self.timing).await?)
    }

    pub async fn checkpoint(&self, lease: LeaseRef, part: &PartRecord) -> Result<(), ApiError> {
        self.store.checkpoint(lease, part).await?;
        self.metrics.rows_committed(part.rows);
        Ok(())
    }

    pub async fn complete(&self, lease: LeaseRef) -> Result<(), ApiError> {
        let coalesced = match &self.coalesced {
            Some(c) => c.completions.call(lease, 1).await,
            None => None,
        };
        match coalesced {
            Some(answer) => answer?,
            None => self.store.complete(lease).await?,
        }
        self.metrics.shard_completed();
        Ok(())
    }

    /// Completes several shards: one answer per lease, in order, each what `complete` would
    /// give. Only a failure of the store fails the whole request.
    pub async fn complete_many(
        &self,
        leases: &[LeaseRef],
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        if leases.len() > MAX_LEASE_BATCH as usize {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_LEASE_BATCH} leases per request, not {}",
                leases.len()
            )));
        }
        let answers = self.store.complete_many(leases).await?;
        Ok(answers
            .into_iter()
            .map(|answer| {
                if answer.is_ok() {
                    self.metrics.shard_completed();
                }
                answer.map_err(ApiError::from)
            })
            .collect())
    }

    pub async fn fail(
        &self,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
    ) -> Result<(), ApiError> {
        let message: String = message.chars().take(4000).collect();
        tracing::warn!(shard = lease.shard_id, %class, error = %message, "shard failed");
        Ok(self.store.fail(lease, class, &message, self.timing).await?)
    }

    pub async fn release(&self, lease: LeaseRef) -> Result<(), ApiError> {
        Ok(self.store.release(lease).await?)
    }
}
