//! `nightshift run SPEC`: local mode. The same coordinator (on SQLite in `.nightshift/`, serving
//! on 127.0.0.1 with a random port and tokens) and the same workers as a cluster, in one
//! process. Ctrl-C drains and exits; running again resumes from the last checkpoints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nightshift_coordinator::{AllowList, Coordinator, CoordinatorConfig};
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_metastore::{DynMetastore, Metastore};
use nightshift_proto::wire::JobView;
use nightshift_proto::{JobSpec, JobState};
use nightshift_storage::Stores;
use nightshift_worker::model_files::ModelFiles;
use nightshift_worker::model_session::ModelSession;
use nightshift_worker::{Worker, WorkerConfig, WorkerError, WorkerReport, onnx_runtime};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::OrtArgs;
use crate::cmd_gpus::GpuArgs;
use crate::progress::Progress;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The job spec (TOML).
    pub spec: PathBuf,
    /// Local workers, each running one shard at a time (default: one per GPU used, else 1).
    #[arg(long)]
    pub workers: Option<usize>,
    #[command(flatten)]
    pub gpus: GpuArgs,
    /// Print one final JSON line instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// Where local state lives.
    #[arg(long, default_value = ".nightshift")]
    pub state: PathBuf,
    /// Discard an existing job of the same name (and its output) and start over.
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub ort: OrtArgs,
}

#[derive(serde::Serialize)]
struct Summary<'a> {
    job: &'a str,
    state: JobState,
    rows: u64,
    seconds: f64,
    rows_per_s: f64,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    crate::logging::init("warn", false);
    let started = Instant::now();
    let spec = crate::spec_file::load(&args.spec)?;
    let gpus: Vec<u32> = args.gpus.selected()?.iter().map(|g| g.index).collect();
    let worker_count = args.workers.unwrap_or(gpus.len().max(1));
    if worker_count == 0 {
        bail!("--workers must be at least 1");
    }

    // ONNX Runtime and the model first: a missing library or a model that does not load stops
    // here, before anything is queued.
    let runtime = onnx_runtime::load(args.ort.ort_lib.as_deref())?;
    let stores = Arc::new(Stores::new(
        nightshift_storage::s3::S3Settings::load().await,
    ));
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("cannot create state directory `{}`", args.state.display()))?;
    let _lock = lock_state(&args.state)?;
    let models = args.state.join("models");
    let device_note = probe_model(&stores, &spec, runtime, &models, gpus.first().copied()).await?;
    if !args.json {
        eprintln!("nightshift: {device_note}");
    }
    let sqlite = SqliteStore::open(&args.state.join("nightshift.db")).await?;
    sqlite.migrate().await?;
    let store: DynMetastore = Arc::new(sqlite);

    let mut config = CoordinatorConfig::new("127.0.0.1:0".parse()?);
    let submit_token = uuid::Uuid::new_v4().simple().to_string();
    let worker_token = uuid::Uuid::new_v4().simple().to_string();
    config.submit_tokens = vec![submit_token];
    config.worker_tokens = vec![worker_token.clone()];
    config.allow = AllowList::everything();
    config.finalize_every = Duration::from_millis(200);
    let coordinator = Coordinator::new(config, store.clone(), stores.clone());
    let service = coordinator.service().clone();
    // Compared with the job's by hash as the job keeps it (a path through a link is kept as
    // where it leads).
    let spec = service.admitted(spec)?;

    // The job: new, resumed, or already done.
    let job_id = match store.job_by_name(&spec.name).await? {
        Some(old) if old.spec_hash != spec.hash() || args.restart => {
            if !args.restart {
                bail!(
                    "job `{}` already exists in {} with a different spec; pass --restart to discard it (and its output) and start over",
                    spec.name,
                    args.state.display()
                );
            }
            discard(&stores, &store, &old).await?;
            service.submit(spec.clone(), None).await?.job.id
        }
        Some(old) if old.state == JobState::Succeeded => {
            // What a run that died after the commit left uncollected goes now.
            nightshift_coordinator::collect_pending(&stores, &store, Duration::ZERO).await;
            let view = service.view(&old).await?;
            if args.json {
                print_summary(&view, started.elapsed().as_secs_f64(), 0)?;
            } else {
                eprintln!(
                    "nightshift: job `{}` already succeeded: {} rows in {}",
                    spec.name, view.rows_total, view.output_uri
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(old) => {
            if matches!(old.state, JobState::Failed | JobState::Cancelled) {
                store.retry_job(old.id, false).await?;
            }
            let expired = store.recover_after_crash().await?;
            if !args.json {
                let view = service.view(&old).await?;
                eprintln!(
                    "nightshift: resuming job `{}`: {} of {} rows already committed{}",
                    spec.name,
                    view.rows_done,
                    view.rows_total,
                    if expired > 0 {
                        format!(", {expired} interrupted shard(s) to resume")
                    } else {
                        String::new()
                    }
                );
            }
            old.id
        }
        None => service.submit(spec.clone(), None).await?.job.id,
    };

    let shutdown = CancellationToken::new();
    let interrupted = crate::signals::cancel_on_signal(shutdown.clone());
    let listener = coordinator.bind().await?;
    let url = format!("http://{}", listener.local_addr()?);
    let coordinator_stop = CancellationToken::new();
    let coordinator_task = tokio::spawn(coordinator.run(listener, coordinator_stop.clone()));

    let workers_stop = CancellationToken::new();
    let mut workers = LocalWorkers::default();
    for i in 0..worker_count {
        let wc = local_worker(&args, &url, &worker_token, &gpus, i, worker_count);
        let worker = Worker::build(wc, stores.clone())?;
        workers.tasks.spawn(worker.run(workers_stop.clone()));
    }

    let first = service.get(&job_id.to_string()).await?;
    let rows_at_start = first.rows_done;
    let progress = Progress::new(!args.json, first.rows_total, &spec.name);
    let mut view = first;
    let mut workers_gone = None;
    loop {
        progress.update(&view);
        if view.state.is_terminal() || shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(POLL) => {}
            why = workers.all_stopped() => {
                workers_gone = Some(why);
                break;
            }
        }
        view = service.get(&job_id.to_string()).await?;
    }
    // Drain the workers (on Ctrl-C they finish the batch in flight and checkpoint it), then
    // stop the coordinator.
    workers_stop.cancel();
    workers.all_stopped().await;
    let view = service.get(&job_id.to_string()).await?;
    coordinator_stop.cancel();
    let _ = coordinator_task.await;
    progress.finish();
    if let Some(why) = workers_gone.filter(|_| !view.state.is_terminal()) {
        bail!(
            "every local worker stopped before job `{}` ended ({why}); {} of {} rows are committed, run the same command again to resume",
            spec.name,
            view.rows_done,
            view.rows_total
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let was_interrupted = shutdown.is_cancelled() && !view.state.is_terminal();
    interrupted.abort();
    if args.json {
        print_summary(&view, seconds, view.rows_done.saturating_sub(rows_at_start))?;
    } else if was_interrupted {
        eprintln!(
            "nightshift: interrupted; {} of {} rows committed. Run the same command again to resume.",
            view.rows_done, view.rows_total
        );
    } else {
        report(&view, seconds);
    }
    if was_interrupted {
        return Ok(ExitCode::from(130));
    }
    Ok(if view.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The job's progress is read this often.
const POLL: Duration = Duration::from_millis(200);
/// A local worker looks for work this often when it found none.
const LOCAL_IDLE_POLL: Duration = Duration::from_millis(100);

/// Local worker `i` of `count`: its GPU, and a share of the cores when there are several.
fn local_worker(
    args: &RunArgs,
    url: &str,
    token: &str,
    gpus: &[u32],
    i: usize,
    count: usize,
) -> WorkerConfig {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut wc = WorkerConfig::new(url, token);
    wc.worker_id = format!("local-{}-{i}", std::process::id());
    wc.ort_lib = args.ort.ort_lib.clone();
    wc.gpus = gpus
        .get(i % gpus.len().max(1))
        .copied()
        .into_iter()
        .collect();
    wc.intra_threads = if count > 1 { (cores / count).max(1) } else { 0 };
    wc.cache_dir = args.state.join("models");
    wc.idle_poll = LOCAL_IDLE_POLL;
    wc
}

/// The local workers' tasks. A worker stops on its own only when it cannot go on (its
/// inference threads did not start, it panicked): the job is watched only while one runs.
#[derive(Default)]
struct LocalWorkers {
    tasks: JoinSet<Result<WorkerReport, WorkerError>>,
    /// Why the last worker that stopped on its own did.
    last_error: Option<String>,
}

impl LocalWorkers {
    /// Resolves once every worker has stopped (at once if none runs), with why the last one
    /// that failed did; each failure is logged as it happens. Cancel-safe: a call dropped
    /// before its end loses nothing.
    async fn all_stopped(&mut self) -> String {
        while let Some(ended) = self.tasks.join_next().await {
            let failure = match ended {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("its task ended: {e}")),
            };
            if let Some(why) = failure {
                tracing::error!(error = %why, "a local worker stopped");
                self.last_error = Some(why);
            }
        }
        self.last_error
            .clone()
            .unwrap_or_else(|| "they stopped without an error".into())
    }
}

fn print_summary(view: &JobView, seconds: f64, rows_this_run: u64) -> Result<()> {
    let line = serde_json::to_string(&Summary {
        job: &view.name,
        state: view.state,
        rows: view.rows_done,
        seconds,
        rows_per_s: if seconds > 0.0 {
            rows_this_run as f64 / seconds
        } else {
            0.0
        },
    })?;
    println!("{line}");
    Ok(())
}

fn report(view: &JobView, seconds: f64) {
    match view.state {
        JobState::Succeeded => {
            eprintln!(
                "nightshift: job `{}` succeeded: {} rows ({} poison rows) in {:.1} s -> {}",
                view.name, view.rows_total, view.error_rows, seconds, view.output_uri
            );
            if let Some(text) = &view.text {
                eprintln!("nightshift: text: {text}");
            }
        }
        state => eprintln!(
            "nightshift: job `{}` {state}: {}",
            view.name,
            view.error.as_deref().unwrap_or("no error recorded")
        ),
    }
}

/// Loads the model once before queuing anything: it must load on the chosen device.
async fn probe_model(
    stores: &Stores,
    spec: &JobSpec,
    runtime: &'static onnx_runtime::OnnxRuntime,
    cache: &Path,
    gpu: Option<u32>,
) -> Result<String> {
    let loc = stores.locate(&spec.model.uri)?;
    let path = if loc.is_local() {
        let path = PathBuf::from(loc.uri());
        if !path.is_file() {
            bail!("model: `{}` does not exist", spec.model.uri);
        }
        path
    } else {
        // Fetched into the workers' cache (keyed by ETag), so they do not fetch it again.
        ModelFiles::new(cache.to_path_buf())
            .get(stores, &spec.model.uri)
            .await
            .map_err(|e| anyhow::anyhow!("model: {e}"))?
            .path
    };
    let (uri, device) = (spec.model.uri.clone(), spec.model.device);
    let session = tokio::task::spawn_blocking(move || {
        ModelSession::open(runtime, &uri, &path, device, gpu, 1)
    })
    .await??;
    Ok(format!(
        "device {} ({})",
        session.device, session.device_note
    ))
}

/// One run per state directory at a time.
fn lock_state(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(_) => bail!("another `nightshift run` is using {}", dir.display()),
    }
}

/// `--restart`: the old job's record, parts and output go: `_SUCCESS` first, so that no reader
/// trusts what is left mid-way, and its manifest (`unpublish`), then its files (committed, or
/// written in place by its merge work before it stopped).
async fn discard(
    stores: &Stores,
    store: &DynMetastore,
    old: &nightshift_metastore::JobRecord,
) -> Result<()> {
    let out = stores.locate(&old.output_uri)?;
    nightshift_coordinator::unpublish(&out, &old.uid).await?;
    nightshift_coordinator::remove_job_files(&out, &[old.uid.as_str()].into()).await?;
    nightshift_coordinator::finalizer::collect_garbage(stores, &old.output_uri, &old.uid, &[])
        .await?;
    store.delete_job(old.id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(why: &str) -> Result<WorkerReport, WorkerError> {
        Err(WorkerError::Threads(std::io::Error::other(why.to_string())))
    }

    #[tokio::test]
    async fn the_job_is_watched_while_one_local_worker_runs_and_no_longer() {
        let mut workers = LocalWorkers::default();
        workers.tasks.spawn(async { failed("no threads left") });
        let running = CancellationToken::new();
        let stop = running.clone();
        workers.tasks.spawn(async move {
            stop.cancelled().await;
            failed("the second one")
        });
        let waited = tokio::time::timeout(Duration::from_millis(300), workers.all_stopped()).await;
        assert!(waited.is_err(), "one worker still runs");
        running.cancel();
        let why = workers.all_stopped().await;
        assert!(why.contains("the second one"), "{why}");
        workers.tasks.spawn(async { panic!("a bug") });
        let why = workers.all_stopped().await;
        assert!(why.contains("panicked"), "{why}");
    }
}
