//! The worker pipeline against a bare ONNX Runtime loop.
//!
//! Baseline: every row's features already in memory as one f32 buffer; a loop builds a
//! `[batch, D]` tensor per batch and runs the session (as many intra-op threads as the
//! pipeline's session). Pipeline: the real thing in this process: a coordinator on SQLite and
//! one worker reading the Parquet files, building tensors, inferring, writing parts and
//! checkpointing, timed from the first lease until every shard is done (commit excluded).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Float32Type;
use nightshift_coordinator::{AllowList, Coordinator, CoordinatorConfig};
use nightshift_metastore::sqlite::SqliteStore;
use nightshift_metastore::{DynMetastore, Metastore};
use nightshift_proto::{Device, JobSpec, JobState};
use nightshift_storage::Stores;
use nightshift_worker::{Worker, WorkerConfig, onnx_runtime};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio_util::sync::CancellationToken;

/// How often the bench looks whether the timed job's shards are done: a read of the
/// coordinator's count of completed shards, which costs the pipeline nothing (a query of the
/// job's shards every 2 ms took 5% of the machine's CPU from it).
const DONE_POLL: Duration = Duration::from_millis(1);
/// Every this many looks, the bench also reads the job's state, to stop on a failed job.
const STATE_EVERY: u32 = 200;

#[derive(clap::Args)]
pub struct Args {
    /// Input directory (default: generate the demo data into a temp dir).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model (default: generate the demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Hidden layer width when generating the model (the demo model's is the default).
    #[arg(long)]
    hidden: Option<usize>,
    /// Rows when generating data.
    #[arg(long, default_value_t = 300_000)]
    rows: usize,
    /// Measurements of each side; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// ONNX Runtime intra-op threads for both sides (0: its default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also measure the peak memory of `nightshift run` on N and 4N rows (N = --rows / 3).
    #[arg(long)]
    memory: bool,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

pub async fn run(a: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (data, model) = match (&a.data, &a.model) {
        (Some(d), Some(m)) => (d.clone(), m.clone()),
        _ => generate(tmp.path(), a.rows, a.hidden)?,
    };
    let runtime = onnx_runtime::load(a.ort_lib.as_deref())?;
    let (features, dim) = load_features(&data)?;
    let rows = features.len() / dim;
    println!(
        "pipeline bench: {rows} rows x {dim} features, batch {}, model {}",
        a.batch,
        model.display()
    );

    let mut bare = Vec::new();
    let mut piped = Vec::new();
    for i in 0..a.repeat {
        bare.push(bare_loop(
            runtime,
            &model,
            &features,
            dim,
            a.batch,
            a.threads,
            Device::Cpu,
        )?);
        let spec = |name: &str, input: &str, out: &Path| {
            bench_spec(name, input, &model, out, a.batch, Device::Cpu)
        };
        let p = pipeline(tmp.path(), &data, &spec, a.threads, i, Device::Cpu);
        piped.push(p.await?);
        println!(
            "  run {}: bare {:>10.0} rows/s   pipeline {:>10.0} rows/s",
            i + 1,
            bare[i],
            piped[i]
        );
    }
    let (b, p) = (median(&mut bare), median(&mut piped));
    println!(
        "bare ONNX Runtime loop : {b:>10.0} rows/s (median of {})",
        a.repeat
    );
    println!(
        "worker pipeline        : {p:>10.0} rows/s (median of {})",
        a.repeat
    );
    println!("ratio pipeline / bare  : {:.3}", p / b);
    if a.memory {
        memory(tmp.path(), &model, a.rows / 3)?;
    }
    Ok(())
}

/// Peak resident memory of `nightshift run` (the binary beside this one) on inputs of N and 4N
/// rows: the pipeline's buffers are bounded, so the peak should not grow with the input.
fn memory(dir: &Path, model: &Path, n: usize) -> Result<()> {
    let bin = std::env::current_exe()?.with_file_name("nightshift");
    if !bin.is_file() {
        bail!(
            "{} not built (cargo build --release -p nightshift)",
            bin.display()
        );
    }
    let mut peaks = Vec::new();
    for rows in [n, 4 * n] {
        let data = dir.join(format!("mem-{rows}"));
        generate_data(&data, rows, 4)?;
        let out = dir.join(format!("mem-out-{rows}"));
        let spec = dir.join(format!("mem-{rows}.toml"));
        std::fs::write(
            &spec,
            format!(
                "name = \"mem-{rows}\"\n[input]\nuri = \"{}/*.parquet\"\n[model]\nuri = \"{}\"\ndevice = \"cpu\"\n\
                 [model.inputs]\nx = \"features\"\n[model.outputs]\nlogits = \"logits\"\n[output]\nuri = \"{}\"\n\
                 passthrough = [\"id\"]\n",
                data.display(),
                model.display(),
                out.display()
            ),
        )?;
        let child = std::process::Command::new(&bin)
            .arg("run")
            .arg(&spec)
            .arg("--json")
            .arg("--state")
            .arg(dir.join(format!("mem-state-{rows}")))
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child, whose pid is valid until reaped here.
        let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
        if rc < 0 || status != 0 {
            bail!("nightshift run on {rows} rows failed (status {status})");
        }
        let mib = usage.ru_maxrss as f64 / 1024.0;
        println!("peak memory of `nightshift run`: {rows:>8} rows -> {mib:>7.1} MiB");
        peaks.push(mib);
    }
    println!(
        "peak memory ratio 4N / N rows  : {:.2}",
        peaks[1] / peaks[0]
    );
    Ok(())
}

fn generate_data(dir: &Path, rows: usize, files: usize) -> Result<()> {
    let rows = rows.to_string();
    let files = files.to_string();
    python(&[
        "gen_data.py",
        "--out",
        dir.to_str().unwrap_or_default(),
        "--rows",
        &rows,
        "--files",
        &files,
    ])
}

pub(crate) fn python(args: &[&str]) -> Result<()> {
    python_output(args).map(|_| ())
}

/// Runs a script of `scripts/` with the project's Python and answers what it printed.
pub(crate) fn python_output(args: &[&str]) -> Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("NIGHTSHIFT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv"))
        .join("bin/python");
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts").join(args[0]))
        .args(&args[1..])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| {
            format!(
                "running {} with {} (run scripts/setup.sh first)",
                args[0],
                python.display()
            )
        })?;
    if !out.status.success() {
        bail!("{} failed", args[0]);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn generate(dir: &Path, rows: usize, hidden: Option<usize>) -> Result<(PathBuf, PathBuf)> {
    let data = dir.join("data");
    let model = dir.join("mlp.onnx");
    generate_data(&data, rows, 3)?;
    let hidden = hidden.map(|h| h.to_string());
    let mut args = vec!["gen_model.py", "--out", model.to_str().unwrap_or_default()];
    if let Some(h) = &hidden {
        args.extend(["--hidden", h]);
    }
    python(&args)?;
    Ok((data, model))
}

/// Every row's `features` as one f32 buffer.
pub(crate) fn load_features(dir: &Path) -> Result<(Vec<f32>, usize)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    let mut dim = 0;
    for f in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&f)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            let col = batch
                .column_by_name("features")
                .context("no `features` column")?;
            let list = col.as_fixed_size_list();
            dim = list.value_length() as usize;
            let values = list.values().as_primitive::<Float32Type>();
            out.extend_from_slice(
                &values.values()[list.offset() * dim..(list.offset() + list.len()) * dim],
            );
        }
    }
    Ok((out, dim))
}

/// Rows/s of a loop that builds each batch's tensor from `features` and runs the session on
/// `device` (`cpu` or `cuda:N`).
pub(crate) fn bare_loop(
    runtime: &onnx_runtime::OnnxRuntime,
    model: &Path,
    features: &[f32],
    dim: usize,
    batch: usize,
    threads: usize,
    device: Device,
) -> Result<f64> {
    let ort_err = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow::anyhow!("{e}");
    let mut b = Session::builder(&runtime.env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_err)?;
    if threads > 0 {
        b = b.with_intra_threads(threads).map_err(ort_err)?;
    }
    if let Device::Cuda(n) = device {
        b = b
            .with_execution_providers([ort::ep::CUDA::default()
                .with_device_id(n as i32)
                .build()
                .error_on_failure()])
            .map_err(ort_err)?;
    }
    let mut session = b.commit_from_file(model)?;
    let rows = features.len() / dim;
    let started = Instant::now();
    let mut checksum = 0f32;
    for start in (0..rows).step_by(batch) {
        let n = batch.min(rows - start);
        let x = Tensor::from_array((
            [n as i64, dim as i64],
            features[start * dim..(start + n) * dim].to_vec(),
        ))?;
        let out = session.run(ort::inputs!["x" => x])?;
        let (_, y) = out["logits"].try_extract_tensor::<f32>()?;
        checksum += y[0];
    }
    let took = started.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    Ok(rows as f64 / took)
}

/// A job over `input` with the bench's model, batch size and device.
/// A timed job's spec from its name, input URI and output directory.
pub(crate) type SpecFn<'a> = &'a (dyn Fn(&str, &str, &Path) -> Result<JobSpec> + Sync);

pub(crate) fn bench_spec(
    name: &str,
    input: &str,
    model: &Path,
    out: &Path,
    batch: usize,
    device: Device,
) -> Result<JobSpec> {
    let job = Job {
        name,
        input,
        model,
        out,
        device,
    };
    job.spec(
        "[model.inputs]\nx = \"features\"\n[model.outputs]\nlogits = \"logits\"\n",
        &format!("[batch]\nsize = {batch}\n[shards]\nrows = 100000\n"),
    )
}

/// What every bench job names: where it reads, which model on which device, where it writes.
pub(crate) struct Job<'a> {
    pub name: &'a str,
    pub input: &'a str,
    pub model: &'a Path,
    pub out: &'a Path,
    pub device: Device,
}

impl Job<'_> {
    /// The job with the model's column `mapping` (`[model.inputs]` and `[model.outputs]`)
    /// and the `rest` of the spec after `[output]`; the output keeps the `id` column.
    pub(crate) fn spec(&self, mapping: &str, rest: &str) -> Result<JobSpec> {
        let toml = format!(
            "name = \"{}\"\n[input]\nuri = \"{}\"\n[model]\nuri = \"{}\"\ndevice = \"{}\"\n\
             {mapping}[output]\nuri = \"{}\"\npassthrough = [\"id\"]\n{rest}",
            self.name,
            self.input,
            self.model.display(),
            self.device,
            self.out.display()
        );
        Ok(JobSpec::from_toml(&toml)?)
    }
}

/// Steady-state pipeline throughput: the worker first runs a warm-up job on the same model (so
/// its slot holds a ready session, as it does between shards of a long job), which is let
/// commit, then the timed job, from submission until every shard is done.
pub(crate) async fn pipeline(
    dir: &Path,
    data: &Path,
    spec: SpecFn<'_>,
    threads: usize,
    run: usize,
    device: Device,
) -> Result<f64> {
    let stores = Arc::new(Stores::default());
    let db = dir.join(format!("state-{run}/db.sqlite"));
    let bench = BenchCoordinator::start(&db, stores.clone(), |_| {}).await?;
    let (service, url) = (bench.service.clone(), bench.url.clone());

    let mut wc = WorkerConfig::new(&url, "w");
    wc.intra_threads = threads;
    if let Device::Cuda(n) = device {
        wc.gpus = vec![n];
    }
    wc.idle_poll = Duration::from_millis(2);
    let worker = Worker::build(wc, stores)?;
    let worker_stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(worker_stop.clone()));
    // Done when the coordinator has counted as many more completed shards as the job has,
    // and the job's shards say so.
    let until_done = |id: i64, shards: u64| {
        let (service, store) = (service.clone(), bench.store.clone());
        let target = service.metrics.shards_completed() + shards;
        async move {
            let mut polls = 0u32;
            loop {
                if service.metrics.shards_completed() >= target {
                    let (counts, _, _) = store.shard_counts(id).await?;
                    if counts.done == counts.total() {
                        return Ok::<_, anyhow::Error>(());
                    }
                }
                polls += 1;
                if polls.is_multiple_of(STATE_EVERY) {
                    let view = service.get(&id.to_string()).await?;
                    if view.state.is_terminal() {
                        bail!("bench job ended {}: {:?}", view.state, view.error);
                    }
                }
                tokio::time::sleep(DONE_POLL).await;
            }
        }
    };
    let first = std::fs::read_dir(data)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .min()
        .context("no input files")?;
    let warm = spec(
        &format!("warm-{run}"),
        &first.display().to_string(),
        &dir.join(format!("warm-{run}")),
    )?;
    let warm = service.submit(warm, None).await?.job;
    until_done(warm.id, warm.shards.total()).await?;
    // Its commit too: the coordinator's finalizer re-encodes the warm-up job's parts, which
    // would otherwise take CPU from the timed job.
    loop {
        let view = service.get(&warm.id.to_string()).await?;
        if view.state.is_terminal() {
            if view.state != JobState::Succeeded {
                bail!("warm-up job ended {}: {:?}", view.state, view.error);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let timed = spec(
        &format!("bench-{run}"),
        &format!("{}/*.parquet", data.display()),
        &dir.join(format!("out-{run}")),
    )?;
    let started = Instant::now();
    let job = service.submit(timed, None).await?.job;
    until_done(job.id, job.shards.total()).await?;
    let took = started.elapsed().as_secs_f64();
    worker_stop.cancel();
    let _ = handle.await;
    bench.stop().await;
    Ok(job.rows_total as f64 / took)
}

/// A coordinator on a SQLite store at `db`, serving on a free port in this process, with
/// submit token `s` and worker token `w`; `tune` adjusts its config.
pub(crate) struct BenchCoordinator {
    pub service: nightshift_coordinator::service::Service,
    pub store: DynMetastore,
    pub url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl BenchCoordinator {
    pub async fn start(
        db: &Path,
        stores: Arc<Stores>,
        tune: impl FnOnce(&mut CoordinatorConfig),
    ) -> Result<Self> {
        let sqlite = Arc::new(SqliteStore::open(db).await?);
        sqlite.migrate().await?;
        let store: DynMetastore = sqlite;
        let metastore = store.clone();
        let mut config = CoordinatorConfig::new("127.0.0.1:0".parse()?);
        config.submit_tokens = vec!["s".into()];
        config.worker_tokens = vec!["w".into()];
        config.allow = AllowList::everything();
        tune(&mut config);
        let coordinator = Coordinator::new(config, store, stores);
        let service = coordinator.service().clone();
        let listener = coordinator.bind().await?;
        let url = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let server = tokio::spawn(coordinator.run(listener, stop.clone()));
        Ok(Self {
            service,
            store: metastore,
            url,
            stop,
            server,
        })
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
    }
}
