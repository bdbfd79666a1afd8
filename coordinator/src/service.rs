//! What the coordinator does for people, services and workers, independent of HTTP: submit
//! (check the allow-list, validate, plan, insert atomically), inspect, cancel, retry, and the
//! worker's lease operations. The API and local mode both call these.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightshift_proto::spec_check::{MAX_BATCH_SIZE, MAX_NAME_LEN, job_id_of};
use nightshift_proto::wire::{
    CostView, GpuSample, HeartbeatRequest, HeartbeatResponse, JobList, JobPlan, JobQuery, JobView,
    LeaseRef, LeaseRequest, LeaseResponse, LeaseStatus, LoadedModel, ManifestField, PartRecord,
    ShardLease, SubmitResponse, TextView, TokenCounts,
};
use nightshift_proto::{FailureClass, JobSpec, JobState, LeaseState, check_free_text, check_text};
use nightshift_storage::Stores;
use nightshift_storage::location::{canonical_uri, is_local_uri, resolve_links};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allow_list::AllowList;
use crate::api_error::ApiError;
use crate::coalescer::{Coalescer, Limits};
use crate::cost::PriceTable;
use crate::finalizer::collect_garbage;
use crate::fleet::FleetState;
use crate::job_check::{Checked, check_job};
use crate::lease_check::{Grants, held_by, renew_every};
use crate::metrics::Metrics;
use crate::notifier::CallbackConfig;
use crate::ownership::{remove_job_files, unpublish};
use crate::part_check::{check_counts, check_objects};
use nightshift_metastore::speculation::SpeculationPolicy;
use nightshift_metastore::{
    ClaimRequest, DynMetastore, HeartbeatLot, JobFilter, JobRecord, LeaseHolder, LeaseTiming,
    NewJob, StoreError, Submitted,
};

/// Jobs per page of `GET /v1/jobs` when the query names none, and at most.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;
/// The most shards one lease request may take.
pub const MAX_LEASE_BATCH: u32 = 256;
/// The most leases one heartbeat may name.
const MAX_HEARTBEAT_LEASES: usize = 4096;
/// Hex digits of a spec hash (SHA-256).
const SPEC_HASH_CHARS: usize = 64;
/// The most slots one worker may report.
const MAX_SLOTS_PER_WORKER: u32 = 1024;
/// The most GPUs one worker may report.
pub(crate) const MAX_GPUS_PER_WORKER: usize = 64;
/// Loaded models one heartbeat may name (slots x model cache, with room to spare).
const MAX_MODELS_PER_WORKER: usize = 256;
const MAX_MODEL_URI_CHARS: usize = 2048;
/// Longest worker id accepted.
const MAX_WORKER_ID_CHARS: usize = 200;
/// Longest idempotency key accepted.
const MAX_KEY_CHARS: usize = 200;
/// Speculative copies one claim may get.
const COPIES_PER_CLAIM: u32 = 1;
/// Once a look for stragglers found none, idle workers of this replica look again only after
/// this long.
const SPECULATION_EVERY: Duration = Duration::from_millis(200);
/// An input of at most this many files is planned before `submit` answers; a larger one is
/// checked on one file and planned in the background (`planning.rs`).
pub const INLINE_PLAN_FILES: usize = 64;
/// A shard's failure message is kept to this many characters.
const MAX_FAIL_MESSAGE_CHARS: usize = 4000;

/// Claims in flight at once when coalescing, and shards per claim call.
const CLAIM_LIMITS: Limits = Limits {
    rounds: 4,
    weight: 1024,
};
/// Heartbeat calls in flight at once when coalescing, and leases per call. Heartbeats and
/// checkpoints are the most frequent calls: two rounds each make larger lots, so fewer
/// transactions and database connections at work at once (the load harness at 1,000 workers
/// on two cores: 1,600 rather than 1,870 transactions/s, a lower p99 in each of three paired runs).
const HEARTBEAT_LIMITS: Limits = Limits {
    rounds: 2,
    weight: 1024,
};
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Jobs whose rows per model call a coordinator remembers; past this it forgets them all.
const MAX_REMEMBERED_JOBS: usize = 10_000;
/// Checkpoint calls in flight at once when coalescing, and parts per call (one transaction);
/// two rounds, as for heartbeats.
const CHECKPOINT_LIMITS: Limits = Limits {
    rounds: 2,
    weight: 256,
};
/// Completion calls in flight at once when coalescing, and shards per call.
const COMPLETE_LIMITS: Limits = Limits {
    rounds: 4,
    weight: 1024,
};

#[derive(Clone)]
pub struct Service {
    pub store: DynMetastore,
    pub stores: Arc<Stores>,
    pub allow: AllowList,
    pub timing: LeaseTiming,
    pub metrics: Arc<Metrics>,
    /// Set by `coalescing`: concurrent claims and completions share store calls.
    coalesced: Option<Coalesced>,
    /// Woken when a shard completes or a job is queued, so the finalizer loop queues merge
    /// work, settles jobs and starts queued ones at once rather than at its next tick.
    pub shard_done: Arc<tokio::sync::Notify>,
    /// Woken when a job is to be planned in the background (submitted or retried), so the
    /// planning loop starts it at once.
    pub plan_wanted: Arc<tokio::sync::Notify>,
    /// The callback URL of jobs that name none.
    default_callback: Option<String>,
    /// Whether this coordinator can sign callbacks (it has a secret).
    signs_callbacks: bool,
    /// Jobs that may run at once; more wait as `queued` (`None`: no limit).
    pub max_running_jobs: Option<u32>,
    /// When stragglers get speculative copies (`None`: never).
    pub speculation: Option<SpeculationPolicy>,
    /// When this replica last looked for stragglers and found none: idle workers look again
    /// after `SPECULATION_EVERY`.
    speculated_at: Arc<Mutex<Option<Instant>>>,
    /// Workers' machines and drains (`fleet.rs`).
    pub(crate) fleet: Arc<FleetState>,
    /// Prices of machine time, for jobs' costs (`cost.rs`).
    pub prices: Arc<PriceTable>,
    /// The rows per model call last noted for each job (by uid).
    batch_rows: Arc<Mutex<HashMap<String, u64>>>,
    /// Grants read for lease checks (`lease_check`).
    grants: Arc<Grants>,
}

#[derive(Clone)]
struct Coalesced {
    claims: Coalescer<ClaimRequest, Vec<ShardLease>>,
    /// `(worker, lease)`: each completion is checked against its own worker.
    completions: Coalescer<(String, LeaseRef), ()>,
    heartbeats: Coalescer<HeartbeatLot, Vec<LeaseStatus>>,
    /// Each checkpoint answers its job's uid, or the refusal (a part that is not the lease's
    /// own, a lease that is not the worker's, the store's).
    checkpoints: Coalescer<Checkpoint, Result<String, ApiError>>,
}

/// A worker's checkpoint, as `checkpoint_lot` takes several at once.
#[derive(Clone)]
struct Checkpoint {
    worker: String,
    lease: LeaseRef,
    part: PartRecord,
}

impl Service {
    pub fn new(
        store: DynMetastore,
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
            shard_done: Arc::new(tokio::sync::Notify::new()),
            plan_wanted: Arc::new(tokio::sync::Notify::new()),
            speculation: Some(SpeculationPolicy::default()),
            speculated_at: Arc::new(Mutex::new(None)),
            default_callback: None,
            signs_callbacks: false,
            max_running_jobs: None,
            fleet: Arc::new(FleetState::default()),
            batch_rows: Arc::default(),
            grants: Arc::default(),
            prices: Arc::new(PriceTable::default()),
        }
    }

    /// This service with jobs' completion callbacks as `config` sets them.
    pub fn with_callbacks(mut self, config: &CallbackConfig) -> Self {
        self.default_callback = config.default_url.clone();
        self.signs_callbacks = config.secret.is_some();
        self
    }

    /// A job without a callback of its own takes the default; one that has a callback needs
    /// a coordinator that can sign it.
    fn callback(&self, spec: &mut JobSpec) -> Result<(), ApiError> {
        if spec.notify.is_none() {
            spec.notify = self
                .default_callback
                .clone()
                .map(|url| nightshift_proto::NotifySpec { url });
        }
        if spec.notify.is_some() && !self.signs_callbacks {
            return Err(ApiError::Spec(nightshift_proto::SpecError {
                key: Some("notify.url".into()),
                line: None,
                message: "this coordinator cannot sign callbacks: they are posted by \
                          `nightshift coordinator` given a secret (--notify-secret-file)"
                    .into(),
            }));
        }
        Ok(())
    }

    /// This service with concurrent claims, completions and heartbeats coalesced into
    /// `claim_many`, `complete_many` and `heartbeat_many` calls (see `coalescer`), until
    /// `shutdown`.
    pub fn coalescing(mut self, shutdown: CancellationToken, tasks: &TaskTracker) -> Self {
        let (store, timing) = (self.store.clone(), self.timing);
        let claims = Coalescer::start(
            CLAIM_LIMITS,
            Arc::new(move |requests: Vec<ClaimRequest>| {
                let store = store.clone();
                Box::pin(async move { store.claim_many(&requests, timing).await })
            }),
            shutdown.clone(),
            tasks,
        );
        let (store, grants) = (self.store.clone(), self.grants.clone());
        let completions = Coalescer::start(
            COMPLETE_LIMITS,
            Arc::new(move |requests: Vec<(String, LeaseRef)>| {
                let (store, grants) = (store.clone(), grants.clone());
                Box::pin(async move { complete_lot(&store, &grants, &requests).await })
            }),
            shutdown.clone(),
            tasks,
        );
        let (store, grants) = (self.store.clone(), self.grants.clone());
        let heartbeats = Coalescer::start(
            HEARTBEAT_LIMITS,
            Arc::new(move |lots: Vec<HeartbeatLot>| {
                let (store, grants) = (store.clone(), grants.clone());
                Box::pin(async move { heartbeat_lot(&store, &grants, timing, &lots).await })
            }),
            shutdown.clone(),
            tasks,
        );
        let lots = (self.store.clone(), self.grants.clone(), self.stores.clone());
        let checkpoints = Coalescer::start(
            CHECKPOINT_LIMITS,
            Arc::new(move |requests: Vec<Checkpoint>| {
                let (store, grants, stores) = lots.clone();
                Box::pin(async move { checkpoint_lot(&store, &grants, &stores, &requests).await })
            }),
            shutdown,
            tasks,
        );
        self.coalesced = Some(Coalesced {
            claims,
            completions,
            heartbeats,
            checkpoints,
        });
        self
    }

    /// The job `own_uid` holds `output_uri`, which cancelled jobs held before it. None of them
    /// can be retried now, nor after this job ends (`files_removed`), so the files their merge
    /// work wrote in place there (which would block this job's own) go. A cancelled job holds
    /// no output, so for one this does nothing. Answers the jobs whose
    /// files are all gone now (removed by this call or before it); a failure is logged, and
    /// the job's merge work then names the file in its way.
    async fn clear_released_output(&self, own_uid: &str, output_uri: &str) -> HashSet<String> {
        let cancelled = match self.store.cancelled_at(output_uri).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(output = output_uri, error = %e, "reading the output's earlier jobs failed");
                return HashSet::new();
            }
        };
        // A cancelled job holds no output: its merge work, whose lease lives on until it
        // expires, clears nothing of the jobs that took the output after it.
        if cancelled.iter().any(|j| j.uid == own_uid) {
            return HashSet::new();
        }
        if cancelled.is_empty() {
            return HashSet::new();
        }
        // Their checkpoints are about to point at nothing: no retry may resume from them. One
        // retried since it was read is not marked, and its files stay.
        let ids: Vec<i64> = cancelled.iter().map(|old| old.id).collect();
        let marked = match self.store.files_removed(&ids).await {
            Ok(marked) => marked,
            Err(e) => {
                tracing::warn!(output = output_uri, error = %e, "marking the output's earlier jobs failed; their files stay");
                return HashSet::new();
            }
        };
        let cancelled: Vec<&JobRecord> = cancelled
            .iter()
            .filter(|j| marked.contains(&j.id))
            .collect();
        let mut cleared = HashSet::new();
        for (output_uri, uids) in by_output(&cancelled) {
            let removed = match self.stores.locate(output_uri) {
                Ok(out) => remove_job_files(&out, &uids).await,
                Err(e) => Err(e),
            };
            match removed {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(
                            output = output_uri,
                            files = n,
                            "cancelled jobs' files removed"
                        );
                    }
                    self.collect_parts(output_uri, &uids).await;
                    cleared.extend(uids.into_iter().map(str::to_string));
                }
                Err(e) => {
                    tracing::warn!(output = output_uri, error = %e, "removing cancelled jobs' files failed")
                }
            }
        }
        cleared
    }

    /// Removes the parts directories of jobs `uids` at `output_uri`, whose files were removed,
    /// with the uploads left open under them: nothing may resume from them any more.
    async fn collect_parts(&self, output_uri: &str, uids: &HashSet<&str>) {
        for uid in uids {
            match collect_garbage(&self.stores, output_uri, uid, &[]).await {
                Ok(g) if g.objects + g.uploads > 0 => tracing::info!(
                    output = output_uri,
                    job = uid,
                    objects = g.objects,
                    uploads = g.uploads,
                    "cancelled job's parts removed"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(output = output_uri, job = uid, error = %e, "removing a cancelled job's parts failed")
                }
            }
        }
    }

    /// After `job` committed: parts that workers of the cancelled jobs whose files its
    /// submission removed wrote after that (a worker learns of the cancel at its next call)
    /// go too.
    pub(crate) async fn collect_released_parts(&self, job: &JobRecord) {
        let cancelled = match self.store.cancelled_at(&job.output_uri).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(output = job.output_uri, error = %e, "reading the output's earlier jobs failed");
                return;
            }
        };
        let released: Vec<&JobRecord> = cancelled
            .iter()
            .filter(|old| old.uid != job.uid && old.files_removed_at_ms.is_some())
            .collect();
        for (output_uri, uids) in by_output(&released) {
            self.collect_parts(output_uri, &uids).await;
        }
    }

    /// Merge work that failed for good may have met a file that a cancelled job's worker
    /// finished writing at its output name after this job's submission cleared that job's
    /// files (the worker learns of the cancel at its next call); the report names that job
    /// (`taken_by`). When it is one of the cancelled jobs whose files are now gone, the merge
    /// is tried again instead of dying. Whose the file was decides, not whether this call
    /// removed it: two merges meeting two such files at once both retry, though the first
    /// report's clean-up removes both files.
    async fn merge_failure_class(
        &self,
        holder: &LeaseHolder,
        class: FailureClass,
        taken_by: Option<&str>,
    ) -> FailureClass {
        let Some(owner) = taken_by else {
            return class;
        };
        if class != FailureClass::Permanent || holder.merge_files.is_none() {
            return class;
        }
        let cleared = self
            .clear_released_output(&holder.job_uid, &holder.output_uri)
            .await;
        if !cleared.contains(owner) {
            return class;
        }
        tracing::info!(job = %holder.job_uid, shard = holder.shard_id, "merge work met a cancelled job's file, now removed: it is tried again");
        FailureClass::Retryable
    }

    /// What every job passes before it is made, submitted or made by a schedule: the spec's
    /// rules, the callback the coordinator can sign, and URIs the allow-list admits (local
    /// ones absolute, links followed; an output in the one spelling it is owned by).
    pub(crate) fn admit(&self, spec: &mut JobSpec) -> Result<(), ApiError> {
        spec.check().map_err(ApiError::Spec)?;
        self.callback(spec)?;
        let mut uris = vec![
            ("input.uri", &mut spec.input.uri),
            ("model.uri", &mut spec.model.uri),
            ("output.uri", &mut spec.output.uri),
        ];
        if let Some(text) = spec.text.as_mut() {
            uris.push(("text.tokenizer", &mut text.tokenizer));
        }
        for (field, uri) in uris {
            if is_local_uri(uri) {
                if !uri.trim_start_matches("file://").starts_with('/') {
                    return Err(ApiError::UriNotAllowed {
                        key: field,
                        uri: uri.clone(),
                        reason: "local paths in a submitted spec must be absolute".into(),
                    });
                }
                // Links are followed first: the allow-list judges where a path really leads.
                *uri = resolve_links(uri);
            } else if field == "output.uri" {
                // Outputs are owned by prefix: each place is stored in one spelling only.
                *uri = canonical_uri(uri);
            }
            self.allowed(field, uri)?;
        }
        Ok(())
    }

    /// `spec` as a job keeps it once admitted (local paths with their links followed, the
    /// output in its one spelling): what a rerun of the same spec file is compared by.
    pub fn admitted(&self, mut spec: JobSpec) -> Result<JobSpec, ApiError> {
        self.admit(&mut spec)?;
        Ok(spec)
    }

    /// Submits a job. With an idempotency key, the same key and spec return the existing job
    /// (created: false); the same key with another spec is a conflict.
    pub async fn submit(
        &self,
        mut spec: JobSpec,
        key: Option<String>,
    ) -> Result<SubmitResponse, ApiError> {
        self.admit(&mut spec)?;
        if let Some(k) = &key {
            if k.is_empty() || k.chars().count() > MAX_KEY_CHARS {
                return Err(ApiError::BadRequest(format!(
                    "Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters"
                )));
            }
            check_text("Idempotency-Key", k)?;
            if let Some(existing) = self.store.job_by_key(k).await? {
                return if existing.spec_hash == spec.hash() {
                    Ok(SubmitResponse {
                        created: false,
                        job: self.view(&existing).await?,
                    })
                } else {
                    Err(ApiError::Metastore(StoreError::IdempotencyConflict {
                        key: k.clone(),
                        job_id: existing.id,
                    }))
                };
            }
        }
        let checked = check_job(&self.stores, &spec, INLINE_PLAN_FILES)
            .await
            .map_err(ApiError::Check)?;
        let (plan, planning) = match checked {
            Checked::Planned(plan) => (plan, None),
            Checked::Sampled { sample } => (JobPlan::default(), Some(sample)),
        };
        // A glob inside an allowed directory may still match a link that leads out of it.
        for uri in plan.files.iter().map(|f| &f.uri).chain(&planning) {
            if is_local_uri(uri) {
                self.allowed("input.uri", &resolve_links(uri))?;
            }
        }
        let submitted = self
            .store
            .create_job(NewJob {
                uid: uuid::Uuid::new_v4().simple().to_string()[..16].to_string(),
                spec,
                idempotency_key: key,
                plan,
                queued: self.max_running_jobs.is_some(),
                planning: planning.is_some(),
            })
            .await?;
        let created = matches!(submitted, Submitted::Created(_));
        if created {
            let job = submitted.job();
            self.clear_released_output(&job.uid, &job.output_uri).await;
        }
        if created && planning.is_some() {
            self.plan_wanted.notify_one();
        }
        if created && self.max_running_jobs.is_some() {
            // The finalizer loop starts queued jobs: now, not at its next tick.
            self.shard_done.notify_one();
        }
        let job = self.view(submitted.job()).await?;
        if created {
            tracing::info!(job = job.id, name = %job.name, rows = job.rows_total, shards = job.shards.total(), "job submitted");
        }
        Ok(SubmitResponse { created, job })
    }

    /// The allow-list's verdict on `uri`, given in `field`.
    pub(crate) fn allowed(&self, field: &'static str, uri: &str) -> Result<(), ApiError> {
        match self.allow.refusal(uri.trim_end_matches('/')) {
            None => Ok(()),
            Some(reason) => Err(ApiError::UriNotAllowed {
                key: field,
                uri: uri.to_string(),
                reason,
            }),
        }
    }

    pub async fn view(&self, job: &JobRecord) -> Result<JobView, ApiError> {
        let (counts, done, errors) = self.store.shard_counts(job.id).await?;
        let now = self.store.now_ms().await?;
        let mut view = crate::job_view::job_view(job, counts, done, errors, now);
        if !job.state.is_terminal() {
            view.model_held_by = self.metrics.model_holders(&job.spec.model.uri);
        }
        if job.spec.notify.is_some() {
            view.notify = self.store.notification(job.id).await?;
        }
        view.cost = Some(self.job_cost(job, view.rows_done).await?);
        if job.spec.text.is_some() {
            let sums = self.store.token_sums(job.id).await?;
            view.text = Some(TextView {
                padding_efficiency: sums.real as f64 / sums.padded.max(1) as f64,
                tokens: TokenCounts {
                    real: sums.real,
                    padded: sums.padded,
                    truncated_rows: sums.truncated_rows,
                },
            });
        }
        Ok(view)
    }

    /// What a job's leases cost so far.
    pub async fn job_cost(&self, job: &JobRecord, rows_done: u64) -> Result<CostView, ApiError> {
        let usage = self.store.job_usage(job.id).await?;
        Ok(self.prices.cost(&usage, rows_done))
    }

    /// A job by numeric id or, failing that, the newest job of that name.
    pub async fn find(&self, id_or_name: &str) -> Result<JobRecord, ApiError> {
        check_text("job", id_or_name)?;
        let found = match job_id_of(id_or_name) {
            Some(id) => self.store.job(id).await?,
            None => self.store.job_by_name(id_or_name).await?,
        };
        found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "no job `{}`",
                nightshift_proto::excerpt(id_or_name)
            ))
        })
    }

    pub async fn get(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        self.view(&job).await
    }

    /// A page of jobs, newest first, as `query` filters them.
    pub async fn list(&self, query: JobQuery) -> Result<JobList, ApiError> {
        let limit = query.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}, not {limit}"
            )));
        }
        for (field, text) in [
            ("name_prefix", &query.name_prefix),
            ("schedule", &query.schedule),
        ] {
            if let Some(text) = text {
                if text.chars().count() > MAX_NAME_LEN {
                    return Err(ApiError::BadRequest(format!(
                        "{field} must be at most {MAX_NAME_LEN} characters"
                    )));
                }
                check_text(field, text)?;
            }
        }
        let filter = JobFilter {
            limit,
            before_id: query.before,
            state: query.state,
            name_prefix: query.name_prefix,
            schedule: query.schedule,
        };
        let jobs = self.store.list_jobs(&filter).await?;
        let mut views = Vec::with_capacity(jobs.len());
        for j in &jobs {
            views.push(self.view(j).await?);
        }
        let full = views.len() == limit as usize;
        Ok(JobList {
            next_before: views.last().filter(|_| full).map(|v| v.id),
            jobs: views,
        })
    }

    pub async fn cancel(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        let job = self.store.cancel_job(job.id).await?;
        self.leases_ended();
        tracing::info!(job = job.id, "job cancelled");
        self.unpublish_if_cancelled(job.id).await;
        self.view(&job).await
    }

    /// When job `id` is cancelled, takes back what its commit published (`unpublish`): a
    /// commit the cancel stopped after its manifest, or a coordinator that died between
    /// publishing and recording the end. A failure is logged: the output's next job is then
    /// refused (the manifest is there) until it is removed by hand.
    pub(crate) async fn unpublish_if_cancelled(&self, id: i64) {
        let job = match self.store.job(id).await {
            Ok(Some(job)) if job.state == JobState::Cancelled => job,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(job = id, error = %e, "reading a cancelled job failed; what it published stays");
                return;
            }
        };
        let taken = match self.stores.locate(&job.output_uri) {
            Ok(out) => unpublish(&out, &job.uid).await,
            Err(e) => Err(e),
        };
        match taken {
            Ok(true) => tracing::info!(job = id, "a cancelled job's _SUCCESS and manifest removed"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job = id, error = %e, "removing a cancelled job's _SUCCESS and manifest failed")
            }
        }
    }

    /// Leases ended other than by their holders: their next heartbeats ask the store.
    pub(crate) fn leases_ended(&self) {
        self.grants.forget_renewals();
    }

    pub async fn retry(&self, id_or_name: &str) -> Result<JobView, ApiError> {
        let job = self.find(id_or_name).await?;
        let queued = self.max_running_jobs.is_some();
        let job = self.store.retry_job(job.id, queued).await?;
        if job.planning {
            self.plan_wanted.notify_one();
        }
        if queued {
            // Past the running limit it waits like a new submission; the finalizer loop
            // starts it when there is room.
            self.shard_done.notify_one();
        }
        tracing::info!(job = job.id, "job retried");
        self.view(&job).await
    }

    // Worker operations. Workers are less trusted than the coordinator: every text they send
    // is checked before it reaches the database or a log, every lease they name must be theirs
    // (`lease_check`), and every part they report must be theirs and add up (`part_check`).

    /// Up to `req.max` shards for the worker, none when it was asked to drain.
    pub async fn lease(&self, req: &LeaseRequest) -> Result<LeaseResponse, ApiError> {
        check_worker_id(&req.worker_id)?;
        self.note_machine(req).await?;
        if self.is_draining(&req.worker_id).await? {
            return Ok(LeaseResponse {
                leases: Vec::new(),
                lease_ttl_ms: self.timing.ttl_ms as u64,
                drain: true,
            });
        }
        let started = Instant::now();
        let request = ClaimRequest {
            worker: req.worker_id.clone(),
            max: req.max.clamp(1, MAX_LEASE_BATCH),
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
        let mut leases = leases;
        if leases.len() < request.max as usize {
            leases.extend(self.speculate(&request.worker).await?);
        }
        self.metrics.lease_claims.observe(started.elapsed());
        Ok(LeaseResponse {
            leases: leases.into_iter().map(|l| l.grant).collect(),
            lease_ttl_ms: self.timing.ttl_ms as u64,
            drain: false,
        })
    }

    /// A copy of a straggler for a worker whose claim left a slot empty, when speculation is
    /// on and no idle worker of this replica just looked in vain. One per claim, so that
    /// copies spread over the idle workers.
    async fn speculate(&self, worker: &str) -> Result<Vec<ShardLease>, ApiError> {
        let Some(policy) = &self.speculation else {
            return Ok(Vec::new());
        };
        let found_none = || self.speculated_at.lock().unwrap_or_else(|p| p.into_inner());
        if found_none().is_some_and(|t| t.elapsed() < SPECULATION_EVERY) {
            return Ok(Vec::new());
        }
        let copies = self
            .store
            .speculate(worker, COPIES_PER_CLAIM, policy, self.timing)
            .await?;
        // Idle workers stop looking for a while only when there was nothing to copy.
        *found_none() = copies.is_empty().then(Instant::now);
        if !copies.is_empty() {
            self.metrics.copies_started(copies.len());
            for c in &copies {
                tracing::info!(
                    job = c.job_id,
                    shard = c.shard_id,
                    worker,
                    "speculative copy of a straggler granted"
                );
            }
        }
        Ok(copies)
    }

    /// The spec of a job that has not ended, by its hash (as lease answers name it).
    pub async fn spec(&self, hash: &str) -> Result<JobSpec, ApiError> {
        let is_hash = hash.len() == SPEC_HASH_CHARS && hash.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hash {
            return Err(ApiError::BadRequest(format!(
                "a spec hash is {SPEC_HASH_CHARS} hex digits, not `{}`",
                nightshift_proto::excerpt(hash)
            )));
        }
        self.store
            .spec_by_hash(hash)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job that has not ended has spec {hash}")))
    }

    /// Extends the leases `worker` holds; any other lease it names answers `lost`. The GPU
    /// samples and models it sends go to `/metrics` when it holds one of them.
    pub async fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, ApiError> {
        let (worker, leases) = (req.worker_id.as_str(), req.leases.as_slice());
        check_worker_id(worker)?;
        check_lease_count(leases.len(), MAX_HEARTBEAT_LEASES)?;
        check_gpu_samples(&req.gpus)?;
        check_loaded_models(&req.models)?;
        check_slots(req.slots)?;
        let lot = HeartbeatLot {
            worker: worker.to_string(),
            leases: leases.to_vec(),
        };
        let weight = leases.len().max(1);
        let coalesced = match &self.coalesced {
            Some(c) => c.heartbeats.call(lot.clone(), weight).await,
            None => None,
        };
        let statuses = match coalesced {
            Some(answer) => answer?,
            None => heartbeat_lot(&self.store, &self.grants, self.timing, &[lot])
                .await?
                .pop()
                .unwrap_or_else(|| Ok(Vec::new()))?,
        };
        // Only a worker holding a lease is remembered: the reports stay as many as the leases,
        // whatever ids workers make up.
        if statuses.iter().any(|s| s.state == LeaseState::Held) {
            self.metrics
                .record_worker(worker, &req.gpus, &req.models, req.slots);
        }
        Ok(HeartbeatResponse {
            leases: statuses,
            drain: self.is_draining(worker).await?,
        })
    }

    /// The grant `worker` holds for `lease`, or `lease_lost`.
    async fn holder(&self, worker: &str, lease: LeaseRef) -> Result<LeaseHolder, ApiError> {
        check_worker_id(worker)?;
        held_by(&self.store, worker, &[lease])
            .await?
            .pop()
            .flatten()
            .ok_or(ApiError::Metastore(StoreError::LeaseLost {
                shard_id: lease.shard_id,
                token: lease.token,
            }))
    }

    pub async fn checkpoint(
        &self,
        worker: &str,
        lease: LeaseRef,
        part: &PartRecord,
        batch_rows: Option<u64>,
    ) -> Result<(), ApiError> {
        check_text("part.uri", &part.uri)?;
        if let Some(uri) = &part.error_uri {
            check_text("part.error_uri", uri)?;
        }
        check_worker_id(worker)?;
        let request = Checkpoint {
            worker: worker.to_string(),
            lease,
            part: part.clone(),
        };
        let coalesced = match &self.coalesced {
            Some(c) => c.checkpoints.call(request.clone(), 1).await,
            None => None,
        };
        let job_uid = match coalesced {
            Some(answer) => answer??,
            None => checkpoint_lot(&self.store, &self.grants, &self.stores, &[request])
                .await?
                .pop()
                .ok_or(StoreError::Corrupt("no answer for a checkpoint".into()))???,
        };
        self.metrics.rows_committed(part.rows);
        if let Some(rows) = batch_rows.filter(|&r| (1..=MAX_BATCH_SIZE).contains(&r)) {
            self.note_batch_rows(&job_uid, rows).await?;
        }
        Ok(())
    }

    /// Notes the rows per model call a job's worker reports, in the store only when it is not
    /// what this coordinator noted last for the job.
    async fn note_batch_rows(&self, job_uid: &str, rows: u64) -> Result<(), ApiError> {
        if lock(&self.batch_rows).get(job_uid) == Some(&rows) {
            return Ok(());
        }
        self.store.note_batch_rows(job_uid, rows).await?;
        let mut noted = lock(&self.batch_rows);
        if noted.len() >= MAX_REMEMBERED_JOBS {
            noted.clear();
        }
        noted.insert(job_uid.to_string(), rows);
        Ok(())
    }

    pub async fn complete(&self, worker: &str, lease: LeaseRef) -> Result<(), ApiError> {
        check_worker_id(worker)?;
        let request = (worker.to_string(), lease);
        let coalesced = match &self.coalesced {
            Some(c) => c.completions.call(request.clone(), 1).await,
            None => None,
        };
        match coalesced {
            Some(answer) => answer?,
            None => complete_lot(&self.store, &self.grants, &[request])
                .await?
                .pop()
                .unwrap_or(Ok(()))?,
        }
        self.metrics.shard_completed();
        self.shard_done.notify_one();
        Ok(())
    }

    /// Completes several shards: one answer per lease, in order, each what `complete` would
    /// give. Only a failure of the store fails the whole request.
    pub async fn complete_many(
        &self,
        worker: &str,
        leases: &[LeaseRef],
    ) -> Result<Vec<Result<(), ApiError>>, ApiError> {
        check_worker_id(worker)?;
        check_lease_count(leases.len(), MAX_LEASE_BATCH as usize)?;
        let requests: Vec<(String, LeaseRef)> =
            leases.iter().map(|l| (worker.to_string(), *l)).collect();
        let answers = complete_lot(&self.store, &self.grants, &requests).await?;
        Ok(answers
            .into_iter()
            .map(|answer| {
                if answer.is_ok() {
                    self.metrics.shard_completed();
                    self.shard_done.notify_one();
                }
                answer.map_err(ApiError::from)
            })
            .collect())
    }

    pub async fn fail(
        &self,
        worker: &str,
        lease: LeaseRef,
        class: FailureClass,
        message: &str,
        taken_by: Option<&str>,
    ) -> Result<(), ApiError> {
        let message: String = message.chars().take(MAX_FAIL_MESSAGE_CHARS).collect();
        check_free_text("message", &message)?;
        let holder = self.holder(worker, lease).await?;
        // Debug formatting escapes the worker's text: it cannot forge log lines.
        tracing::warn!(shard = lease.shard_id, worker = ?worker, %class, error = ?message, "shard failed");
        let class = self.merge_failure_class(&holder, class, taken_by).await;
        Ok(self.store.fail(lease, class, &message, self.timing).await?)
    }

    pub async fn release(&self, worker: &str, lease: LeaseRef) -> Result<(), ApiError> {
        self.holder(worker, lease).await?;
        self.store.release(lease).await?;
        self.grants.forget([lease]);
        Ok(())
    }
}

/// Completes each `(worker, lease)` that its worker holds (one read for all, one store call for
/// those held); the others answer `lease_lost`.
async fn complete_lot(
    store: &DynMetastore,
    grants: &Grants,
    requests: &[(String, LeaseRef)],
) -> nightshift_metastore::Result<Vec<nightshift_metastore::Result<()>>> {
    let workers: Vec<&str> = requests.iter().map(|(w, _)| w.as_str()).collect();
    let leases: Vec<LeaseRef> = requests.iter().map(|(_, l)| *l).collect();
    let held = grants.held_by_each(store, &workers, &leases).await?;
    let lost = |l: &LeaseRef| {
        Err(StoreError::LeaseLost {
            shard_id: l.shard_id,
            token: l.token,
        })
    };
    let answers = on_held(&leases, &held, lost, |mine| async move {
        store.complete_many(&mine).await
    })
    .await?;
    grants.forget(
        leases
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.is_ok())
            .map(|(l, _)| *l),
    );
    Ok(answers)
}

/// What a heartbeat does for one lease it names.
#[derive(Clone, Copy, PartialEq)]
enum Beat {
    /// Not held by the worker: answered `lost`.
    NotHeld,
    /// Held and extended by this replica less than `renew_every` ago: answered `held`
    /// without a write (`lease_check`).
    Fresh,
    /// Held: extended in the store, which answers.
    Due,
}

/// Heartbeats of several workers: one read checks that each holds the leases it names (any
/// other answers `lost`), one store call extends the held ones of all of them that this
/// replica has not extended lately.
async fn heartbeat_lot(
    store: &DynMetastore,
    grants: &Grants,
    timing: LeaseTiming,
    lots: &[HeartbeatLot],
) -> nightshift_metastore::Result<Vec<nightshift_metastore::Result<Vec<LeaseStatus>>>> {
    let (workers, leases): (Vec<&str>, Vec<LeaseRef>) = lots
        .iter()
        .flat_map(|lot| lot.leases.iter().map(|l| (lot.worker.as_str(), *l)))
        .unzip();
    let held = grants.held_by_each(store, &workers, &leases).await?;
    let every = renew_every(timing);
    let mut held = leases.iter().zip(held);
    // Per lot, what each of its leases takes; lots with none due need no store call.
    let beats: Vec<Vec<Beat>> = lots
        .iter()
        .map(|lot| {
            lot.leases
                .iter()
                .map(|_| match held.next() {
                    Some((l, Some(_))) if grants.renewed_within(l, every) => Beat::Fresh,
                    Some((_, Some(_))) => Beat::Due,
                    _ => Beat::NotHeld,
                })
                .collect()
        })
        .collect();
    let due: Vec<HeartbeatLot> = lots
        .iter()
        .zip(&beats)
        .filter(|(_, b)| b.contains(&Beat::Due))
        .map(|(lot, b)| HeartbeatLot {
            worker: lot.worker.clone(),
            leases: lot
                .leases
                .iter()
                .zip(b)
                .filter(|(_, b)| **b == Beat::Due)
                .map(|(l, _)| *l)
                .collect(),
        })
        .collect();
    let extended = if due.is_empty() {
        Vec::new()
    } else {
        store.heartbeat_many(&due, timing).await?
    };
    grants.note_renewed(
        extended
            .iter()
            .flatten()
            .filter(|s| s.state == LeaseState::Held)
            .map(|s| (s.shard_id, s.token)),
    );
    let mut extended = extended.into_iter();
    Ok(lots
        .iter()
        .zip(&beats)
        .map(|(lot, b)| {
            let mut answers = if b.contains(&Beat::Due) {
                extended.next().unwrap_or_default().into_iter()
            } else {
                Vec::new().into_iter()
            };
            Ok(lot
                .leases
                .iter()
                .zip(b)
                .map(|(l, beat)| {
                    let answered = match beat {
                        Beat::Fresh => Some(LeaseState::Held),
                        Beat::Due => answers.next().map(|s| s.state),
                        Beat::NotHeld => None,
                    };
                    LeaseStatus {
                        shard_id: l.shard_id,
                        token: l.token,
                        state: answered.unwrap_or(LeaseState::Lost),
                    }
                })
                .collect())
        })
        .collect())
}

/// Checkpoints of several workers: one read checks each lease's holder, each part is checked
/// against its lease (place, size, counts), and the parts that pass are recorded in one
/// transaction, in shard order (so two lots lock their shards in one order).
async fn checkpoint_lot(
    store: &DynMetastore,
    grants: &Grants,
    stores: &Stores,
    requests: &[Checkpoint],
) -> nightshift_metastore::Result<Vec<nightshift_metastore::Result<Result<String, ApiError>>>> {
    let workers: Vec<&str> = requests.iter().map(|r| r.worker.as_str()).collect();
    let leases: Vec<LeaseRef> = requests.iter().map(|r| r.lease).collect();
    let held = grants.held_by_each(store, &workers, &leases).await?;
    let checks = requests.iter().zip(&held).map(|(r, h)| async move {
        let Some(holder) = h else {
            return Err(ApiError::Metastore(StoreError::LeaseLost {
                shard_id: r.lease.shard_id,
                token: r.lease.token,
            }));
        };
        check_counts(&r.part, holder.rows)?;
        let schema = check_objects(stores, holder, &r.lease, &r.part).await?;
        Ok((holder.job_uid.clone(), schema))
    });
    type Answer = Result<String, ApiError>;
    let (mut answers, schemas): (Vec<Answer>, Vec<Option<Vec<ManifestField>>>) =
        futures::future::join_all(checks)
            .await
            .into_iter()
            .map(|c| match c {
                Ok((uid, schema)) => (Ok(uid), schema),
                Err(e) => (Err(e), None),
            })
            .unzip();
    let mut passed: Vec<usize> = (0..requests.len())
        .filter(|&i| answers[i].is_ok())
        .collect();
    passed.sort_by_key(|&i| requests[i].lease.shard_id);
    let batch: Vec<(LeaseRef, PartRecord)> = passed
        .iter()
        .map(|&i| (requests[i].lease, requests[i].part.clone()))
        .collect();
    if !batch.is_empty() {
        for (&i, recorded) in passed.iter().zip(store.checkpoint_many(&batch).await?) {
            if let Err(e) = recorded {
                answers[i] = Err(e.into());
            }
        }
    }
    note_schemas(store, &answers, schemas).await?;
    Ok(answers.into_iter().map(Ok).collect())
}

/// Files merge work wrote in place and that were recorded: the first one checked gives the
/// job's output schema.
async fn note_schemas(
    store: &DynMetastore,
    answers: &[Result<String, ApiError>],
    schemas: Vec<Option<Vec<ManifestField>>>,
) -> nightshift_metastore::Result<()> {
    for (answer, fields) in answers.iter().zip(schemas) {
        if let (Ok(uid), Some(fields)) = (answer, fields) {
            let json =
                serde_json::to_string(&fields).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            store.note_output_schema(uid, &json).await?;
        }
    }
    Ok(())
}

/// One answer per lease, in order: `call`'s for the leases that are held (it gets them in
/// order and answers each), `not_held`'s for the others. `call` is skipped when none is held.
async fn on_held<A, F, Fut>(
    leases: &[LeaseRef],
    held: &[Option<LeaseHolder>],
    not_held: impl Fn(&LeaseRef) -> A,
    call: F,
) -> nightshift_metastore::Result<Vec<A>>
where
    F: FnOnce(Vec<LeaseRef>) -> Fut,
    Fut: std::future::Future<Output = nightshift_metastore::Result<Vec<A>>>,
{
    let mine: Vec<LeaseRef> = leases
        .iter()
        .zip(held)
        .filter(|(_, h)| h.is_some())
        .map(|(l, _)| *l)
        .collect();
    let wanted = mine.len();
    let answers = if mine.is_empty() {
        Vec::new()
    } else {
        call(mine).await?
    };
    if answers.len() != wanted {
        return Err(StoreError::Corrupt(format!(
            "{} answers for {wanted} leases",
            answers.len()
        )));
    }
    let mut answers = answers.into_iter();
    Ok(leases
        .iter()
        .zip(held)
        .map(|(l, h)| match h {
            // As many answers as held leases: checked above.
            Some(_) => answers.next().unwrap_or_else(|| not_held(l)),
            None => not_held(l),
        })
        .collect())
}

/// A worker id is 1 to `MAX_WORKER_ID_CHARS` characters of printable text.
pub(crate) fn check_worker_id(worker: &str) -> Result<(), ApiError> {
    if worker.is_empty() || worker.chars().count() > MAX_WORKER_ID_CHARS {
        return Err(ApiError::BadRequest(format!(
            "worker_id must be 1 to {MAX_WORKER_ID_CHARS} characters"
        )));
    }
    Ok(check_text("worker_id", worker)?)
}

/// GPU samples a worker reports: a bounded number, each device once, percentages and memory
/// that make sense.
fn check_gpu_samples(gpus: &[GpuSample]) -> Result<(), ApiError> {
    let bad = |why: String| Err(ApiError::BadRequest(format!("gpus: {why}")));
    if gpus.len() > MAX_GPUS_PER_WORKER {
        return bad(format!(
            "at most {MAX_GPUS_PER_WORKER} per worker, not {}",
            gpus.len()
        ));
    }
    for (i, g) in gpus.iter().enumerate() {
        if g.utilization_percent > 100 {
            return bad(format!(
                "GPU {} is {}% busy",
                g.index, g.utilization_percent
            ));
        }
        if g.memory_used_bytes > g.memory_total_bytes {
            return bad(format!("GPU {} uses more memory than it has", g.index));
        }
        if gpus[..i].iter().any(|o| o.index == g.index) {
            return bad(format!("GPU {} is named twice", g.index));
        }
    }
    Ok(())
}

/// Slots a worker reports: at least one, and a bounded number.
pub(crate) fn check_slots(slots: Option<u32>) -> Result<(), ApiError> {
    match slots {
        Some(n) if n == 0 || n > MAX_SLOTS_PER_WORKER => Err(ApiError::BadRequest(format!(
            "slots: {n} is not between 1 and {MAX_SLOTS_PER_WORKER}"
        ))),
        _ => Ok(()),
    }
}

/// Loaded models a worker reports: a bounded number of plain URIs, each on `cpu` or `cuda:N`.
fn check_loaded_models(models: &[LoadedModel]) -> Result<(), ApiError> {
    let bad = |why: String| Err(ApiError::BadRequest(format!("models: {why}")));
    if models.len() > MAX_MODELS_PER_WORKER {
        return bad(format!(
            "at most {MAX_MODELS_PER_WORKER} per worker, not {}",
            models.len()
        ));
    }
    for m in models {
        if m.uri.is_empty() || m.uri.len() > MAX_MODEL_URI_CHARS {
            return bad(format!(
                "a model URI must be 1 to {MAX_MODEL_URI_CHARS} characters"
            ));
        }
        check_text("models.uri", &m.uri)?;
        use nightshift_proto::Device;
        if !matches!(m.device.parse(), Ok(Device::Cpu | Device::Cuda(_))) {
            return bad(format!(
                "device `{}` is neither `cpu` nor `cuda:N`",
                nightshift_proto::excerpt(&m.device)
            ));
        }
    }
    Ok(())
}

fn check_lease_count(n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::BadRequest(format!(
            "at most {max} leases per request, not {n}"
        )));
    }
    Ok(())
}

/// Jobs' uids by the output each wrote to: one pass per output, for all of its jobs.
fn by_output<'a>(jobs: &[&'a JobRecord]) -> BTreeMap<&'a str, HashSet<&'a str>> {
    let mut by_output: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for job in jobs {
        by_output
            .entry(job.output_uri.as_str())
            .or_default()
            .insert(job.uid.as_str());
    }
    by_output
}
