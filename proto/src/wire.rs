//! JSON bodies of the HTTP API under `/v1`: jobs for people and services, leases for workers.
//! Times are milliseconds since the Unix epoch, read off the database clock.

use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;
use crate::state::{FailureClass, JobState, LeaseState};

/// One input object as it was when the job was planned. Shards that read it refuse to run
/// against any other version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InputFile {
    pub uri: String,
    pub size: u64,
    /// The object's ETag (S3) or modification stamp (local files), when the store has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// A shard as planned: a contiguous, row-group-aligned range of one input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardPlan {
    /// Index into the job's input files.
    pub file_index: u32,
    /// Row groups `[row_group_start, row_group_end)`.
    pub row_group_start: u32,
    pub row_group_end: u32,
    /// Index in the file of the shard's first row.
    pub file_row_start: u64,
    pub rows: u64,
}

/// The result of planning a job: its snapshot of the input and its shards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPlan {
    pub files: Vec<InputFile>,
    pub shards: Vec<ShardPlan>,
    pub rows_total: u64,
}

/// Shards of a job by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardCounts {
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
    pub dead: u64,
    /// Speculative copies of straggling shards running now (not counted in `total`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copies: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ShardCounts {
    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.done + self.dead
    }
}

/// What the API tells about a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: i64,
    pub name: String,
    pub state: JobState,
    pub priority: i32,
    pub spec_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub output_uri: String,
    pub rows_total: u64,
    /// Rows with committed output (checkpointed), poison rows included.
    pub rows_done: u64,
    /// Poison rows isolated to `_errors/`.
    pub error_rows: u64,
    pub shards: ShardCounts,
    pub rows_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// Rows per model call a worker last reported (what `batch.size = "auto"` chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_rows: Option<u64>,
    /// Workers that hold the job's model loaded, as they last reported to this coordinator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_held_by: Vec<ModelHolder>,
    /// The job's completion callback, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifyView>,
    /// A text job's tokens: padding efficiency and texts truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextView>,
    /// What the job's leases cost so far (machine time, and dollars from the coordinator's
    /// price table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostView>,
    /// While the job's shards are still being cut in the background (its state reads
    /// `planning`, or `queued`): how far planning has come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planning: Option<PlanningView>,
}

/// How far a job's background planning has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlanningView {
    /// Input files whose footers are read and whose shards are recorded.
    pub files_planned: u64,
    /// Input files the listing found; absent until the listing is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_listed: Option<u64>,
}

/// A job's cost: machine time its leases held, attributed per slot (a lease on one of a
/// worker's N slots counts 1/N of the machine for as long as it is held), split by how the
/// machine was bought, and priced from the coordinator's price table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostView {
    /// GPU time: the held time of leases on GPU slots, times the GPUs per slot.
    pub gpu_seconds: f64,
    /// Machine time on spot instances.
    pub spot_seconds: f64,
    /// Machine time on on-demand instances.
    pub on_demand_seconds: f64,
    /// Machine time of workers that did not say what they run on.
    pub unknown_seconds: f64,
    /// Of all machine time, what produced nothing that was kept: since the last checkpoint of
    /// each lease that did not complete (preemptions, crashes, failures).
    pub lost_seconds: f64,
    /// Dollars of the priced machine time; none without a price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dollars: Option<f64>,
    /// `dollars` per million rows done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dollars_per_million_rows: Option<f64>,
    /// Machine time the price table has no price for (not in `dollars`).
    pub unpriced_seconds: f64,
}

/// Where a job's completion callback stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NotifyView {
    pub url: String,
    pub state: crate::NotifyState,
    /// POSTs made so far, each recorded with its answer.
    pub attempts: u32,
    /// The HTTP status of the last answer, if one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    /// Why the last attempt failed, if it did without an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A worker holding a model session, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelHolder {
    pub worker: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// `POST /v1/jobs` answer: the job and whether this call created it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub created: bool,
    pub job: JobView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// When the page is full: pass it as `before` for the next (older) page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<i64>,
}

/// `GET /v1/jobs` query: newest first, filtered, a page at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Jobs per page (1 to 1000; 50 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Jobs in this state, as a job's `state` shows it (`planning` while its shards are
    /// still being cut, `running` after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::JobState>,
    /// Jobs whose name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_prefix: Option<String>,
    /// Jobs a schedule of this name made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Jobs older than this job id (the previous page's `next_before`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
}

/// `POST /v1/worker/lease`: up to `max` shards for this worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseRequest {
    pub worker_id: String,
    pub max: u32,
    /// The machine the worker runs on, when it knows (for the fleet scaler and job costs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::fleet::InstanceInfo>,
    /// Shards the worker runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// GPUs its slots use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

/// A granted shard as the lease answer carries it: everything a worker needs to run it but
/// the job's spec, which it names by hash. A worker fetches each spec once
/// (`GET /v1/worker/specs/{hash}`) and keeps it, so a claim of many shards repeats no spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseGrant {
    pub job_id: i64,
    /// Random id of the job, unique across databases: the key prefix of its parts.
    pub job_uid: String,
    pub shard_id: i64,
    /// Fencing token: every write for this shard carries it; a stale one is refused.
    pub token: i64,
    /// Random secret of this grant, known only to the worker it was granted to: every write
    /// carries it, so a lease cannot be used by guessing its (sequential) token.
    pub secret: LeaseSecret,
    /// 1 for the first grant.
    pub attempt: u32,
    pub file: InputFile,
    pub plan: ShardPlan,
    /// Rows of this shard already committed: resume after them.
    pub checkpoint_rows: u64,
    /// The job's spec hash (`JobSpec::hash`).
    pub spec_hash: String,
    /// Merge work instead of rows: rewrite these committed parts (in row order) into one output
    /// file and checkpoint it as this shard's one part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<Vec<PartRecord>>,
    /// For merge work: the output names its files take, written in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_files: Option<MergeFiles>,
}

/// Where merge work writes its files: in place, under the names the manifest will list them
/// by (indexes of `layout::data_file`), so the commit copies nothing. A file with no rows has
/// no index and stays under the lease's part name, like any part.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct MergeFiles {
    /// Index of the output file (`part-NNNNN.parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<u32>,
    /// Index of the error file (`_errors/errors-NNNNN.parquet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<u32>,
}

/// Where a lease puts its part from `row_start` (its error part when `errors`), relative to
/// the output: the output name merge work was given (`MergeFiles`), else the lease's own part
/// name in the job's parts directory. Workers write there; the coordinator takes nothing else.
pub fn part_object(
    job_uid: &str,
    lease: &LeaseRef,
    row_start: u64,
    errors: bool,
    merge_files: Option<&MergeFiles>,
) -> String {
    use crate::layout::{part_name, parts_dir};
    merge_files.and_then(|m| m.name(errors)).unwrap_or_else(|| {
        let name = part_name(lease.shard_id, lease.token, row_start, errors);
        format!("{}/{name}", parts_dir(job_uid))
    })
}

impl MergeFiles {
    /// The output name (relative to the output) of its output file, or of its error file when
    /// `errors`; `None` when that file has no rows.
    pub fn name(&self, errors: bool) -> Option<String> {
        use crate::layout::{ERROR_FILE_STEM, OUTPUT_FILE_STEM, data_file};
        match errors {
            false => self.output.map(|i| data_file(OUTPUT_FILE_STEM, i as usize)),
            true => self.errors.map(|i| data_file(ERROR_FILE_STEM, i as usize)),
        }
    }
}

impl LeaseGrant {
    /// What every write for this lease carries.
    pub fn lease_ref(&self) -> LeaseRef {
        LeaseRef {
            shard_id: self.shard_id,
            token: self.token,
            secret: self.secret,
        }
    }
}

/// A granted shard with its job's spec: what a worker runs. Its grant's fields read through.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardLease {
    pub grant: LeaseGrant,
    pub spec: JobSpec,
}

impl std::ops::Deref for ShardLease {
    type Target = LeaseGrant;
    fn deref(&self) -> &LeaseGrant {
        &self.grant
    }
}

/// A lease's random secret: 128 bits, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseSecret(u128);

impl LeaseSecret {
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    pub fn as_u128(&self) -> u128 {
        self.0
    }

    /// The 32-digit hex form, as the wire and the store hold it.
    pub fn to_hex(&self) -> String {
        format!("{:032x}", self.0)
    }

    /// Parses exactly 32 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        (text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u128::from_str_radix(text, 16).ok().map(Self))
            .flatten()
    }
}

/// Never printed: a secret in a log line would be a credential in the log.
impl std::fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseSecret(..)")
    }
}

impl Serialize for LeaseSecret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for LeaseSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("a lease secret is 32 hex digits"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseResponse {
    pub leases: Vec<LeaseGrant>,
    /// Heartbeat well inside this.
    pub lease_ttl_ms: u64,
    /// The worker was asked to drain: it takes no new shard (none is granted), finishes,
    /// checkpoints and releases what it holds, and exits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

/// Identifies one lease in writes and heartbeats: the shard, the grant's fencing token and
/// the grant's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseRef {
    pub shard_id: i64,
    pub token: i64,
    pub secret: LeaseSecret,
}

/// `POST /v1/heartbeats`: extends every lease still held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatRequest {
    pub worker_id: String,
    pub leases: Vec<LeaseRef>,
    /// How busy the worker's GPUs are (none on a worker without GPUs or without NVML).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuSample>,
    /// The model sessions the worker holds loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<LoadedModel>,
    /// Shards the worker runs at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
}

/// A model session a worker holds loaded.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct LoadedModel {
    /// The model's URI, as the job's spec names it.
    pub uri: String,
    /// Where the session runs: `cpu` or `cuda:N`.
    pub device: String,
}

/// One GPU of a worker at one moment, as NVML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuSample {
    /// The CUDA device number on the worker's machine.
    pub index: u32,
    /// Percent of the last sample period in which a kernel ran (0 to 100).
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseStatus {
    pub shard_id: i64,
    pub token: i64,
    pub state: LeaseState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    pub leases: Vec<LeaseStatus>,
    /// The worker was asked to drain (see `LeaseResponse.drain`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

/// One durably written output object of a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartRecord {
    /// Full URI of the part object.
    pub uri: String,
    /// First row of the part, counted from the shard's start.
    pub row_start: u64,
    /// Input rows the part covers: output rows plus error rows.
    pub rows: u64,
    pub bytes: u64,
    /// Rows of this range that went to the error part instead of the output.
    #[serde(default)]
    pub error_rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_uri: Option<String>,
    #[serde(default)]
    pub error_bytes: u64,
    /// A text job's tokens over the part's rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenCounts>,
}

/// Tokens of a text job's rows: real ones, padded ones (what the model ran over) and texts
/// cut at `max_length`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenCounts {
    pub real: u64,
    pub padded: u64,
    pub truncated_rows: u64,
}

/// A text job's tokens so far, in its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TextView {
    #[serde(flatten)]
    pub tokens: TokenCounts,
    /// Real tokens / padded tokens.
    pub padding_efficiency: f64,
}

impl std::fmt::Display for TextView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "padding efficiency {:.3} ({} real of {} padded tokens), {} texts truncated",
            self.padding_efficiency,
            self.tokens.real,
            self.tokens.padded,
            self.tokens.truncated_rows
        )
    }
}

impl std::fmt::Display for CostView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} s spot, {:.0} s on demand, {:.0} s unknown machines, {:.0} GPU-s, {:.0} s lost",
            self.spot_seconds,
            self.on_demand_seconds,
            self.unknown_seconds,
            self.gpu_seconds,
            self.lost_seconds
        )?;
        if let Some(d) = self.dollars {
            write!(f, "; ${d:.4}")?;
        }
        if let Some(per_m) = self.dollars_per_million_rows {
            write!(f, " (${per_m:.4} per 1M rows)")?;
        }
        Ok(())
    }
}

/// `POST /v1/checkpoints`: records a part and moves the shard's checkpoint past it. The part
/// must start exactly at the current checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointRequest {
    /// The worker that holds the lease(s); any other is refused.
    pub worker_id: String,
    pub lease: LeaseRef,
    pub part: PartRecord,
    /// Rows per model call the worker uses now, shown in the job's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_rows: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompleteRequest {
    /// The worker that holds the lease(s); any other is refused.
    pub worker_id: String,
    pub lease: LeaseRef,
}

/// `POST /v1/worker/complete-many`: several completions in one request (at most 256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompleteManyRequest {
    /// The worker that holds the lease(s); any other is refused.
    pub worker_id: String,
    pub leases: Vec<LeaseRef>,
}

/// One answer per lease, in order: `null` when it completed, else what `complete` would have
/// answered (with status 409).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CompleteManyResponse {
    pub results: Vec<Option<crate::error_code::ErrorBody>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailRequest {
    /// The worker that holds the lease(s); any other is refused.
    pub worker_id: String,
    pub lease: LeaseRef,
    pub class: FailureClass,
    pub message: String,
    /// Merge work that met a file of another job at one of its output names (never
    /// overwritten) names that job's uid here. When it is a cancelled job that held the
    /// output before, its files go and the failure is retried, whatever `class` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseRequest {
    /// The worker that holds the lease(s); any other is refused.
    pub worker_id: String,
    pub lease: LeaseRef,
}

/// The answer to every lease write that was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ack {
    pub ok: bool,
}

/// One output file of a committed job, as listed in `_manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestFile {
    /// Path relative to the output directory.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
}

/// `_manifest.json`: the only files a reader should trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Manifest {
    pub job: String,
    pub job_uid: String,
    pub spec_hash: String,
    pub total_rows: u64,
    pub input_rows: u64,
    pub error_rows: u64,
    pub files: Vec<ManifestFile>,
    #[serde(default)]
    pub error_files: Vec<ManifestFile>,
    /// Arrow schema of the output files, as field name -> data type.
    pub schema: Vec<ManifestField>,
    pub input_snapshot: Vec<InputFile>,
    /// What the job cost (as its status shows it at commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestField {
    pub name: String,
    pub data_type: String,
    pub nullable: bool,
}

/// `POST /v1/schedules`: run a job from `spec` at each fire time of `cron`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Letters, digits, '-' and '_'; unique among schedules.
    pub name: String,
    /// Five fields (minute hour day month weekday), or six with seconds first.
    pub cron: String,
    /// An IANA time zone (`Europe/Berlin`); UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default)]
    pub catch_up: crate::CatchUp,
    /// The job spec as TOML, with `{{ date }}`-style variables filled in at each fire time.
    pub spec: String,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleView {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub catch_up: crate::CatchUp,
    pub paused: bool,
    /// When it fires next (not while paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub spec: String,
    /// The latest fire times, newest first.
    #[serde(default)]
    pub fires: Vec<FireView>,
}

/// One fire time of a schedule: the job it made, or why it made none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FireView {
    pub fire_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/schedules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}

/// `GET /v1/jobs/{job}/shards`: a job's shards in row order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardList {
    pub shards: Vec<ShardView>,
}

/// One shard of a job as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShardView {
    pub id: i64,
    /// The shard's first row within the whole job: shards tile `[0, rows_total)`.
    pub row_start: u64,
    pub rows: u64,
    pub state: crate::ShardState,
    /// Grants so far.
    pub attempts: u32,
    /// Rows with committed output.
    pub rows_done: u64,
    /// Poison rows isolated.
    pub error_rows: u64,
    /// Who holds (or last held) its lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/jobs/{job}/throughput`: rows committed per time bucket, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Throughput {
    pub bucket_ms: u64,
    pub points: Vec<ThroughputPoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ThroughputPoint {
    /// The bucket's start.
    pub at_ms: i64,
    pub rows: u64,
}

/// `GET /v1/workers`: workers that claimed lately or hold a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub id: String,
    /// Its last claim.
    pub last_seen_ms: i64,
    /// Shards it runs at once, as its last heartbeat to this coordinator said, or else its last
    /// claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Rows committed per second over the last minute by the shards it holds.
    pub rows_per_s: f64,
    pub leases: Vec<WorkerLease>,
    /// Its GPUs, as its last heartbeat to this coordinator reported them.
    pub gpus: Vec<GpuSample>,
    /// The machine it runs on, as its last claim said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::fleet::InstanceInfo>,
    /// Asked to drain (`POST /v1/workers/{id}/drain`): it takes no new shard, finishes,
    /// checkpoints and releases what it holds, and exits.
    #[serde(default)]
    pub draining: bool,
    /// A coordinator has told it to drain (answering its claim or heartbeat): once it holds no
    /// lease, its machine may go.
    #[serde(default)]
    pub drain_told: bool,
}

/// A shard a worker holds now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerLease {
    pub job_id: i64,
    pub shard_id: i64,
    pub rows: u64,
    pub rows_done: u64,
}
