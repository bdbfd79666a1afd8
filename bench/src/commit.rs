//! Commit time against output size: two jobs whose outputs differ `--factor` times (1 and
//! 8 GiB by default on local files; smaller on the local S3 server, which holds every object in
//! memory) run to the end with a coordinator and a worker in this process, and the time each
//! spends committing (`nightshift_commit_seconds`) is compared. Workers make the output
//! files while the job runs, in place under their output names, and the coordinator checks
//! each one's footer when it is checkpointed; the commit only finds each file unchanged (one
//! HEAD) and writes the manifest, so the ratio should stay near 1.
//!
//!   cargo run --release -p nightshift-bench -- commit

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_proto::wire::Manifest;
use nightshift_proto::{JobSpec, JobState};
use nightshift_storage::{Stores, read_all};
use nightshift_tests::S3Server;
use nightshift_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{BenchCoordinator, python};

/// Model outputs per row: 4 KiB of float32 per output row.
const CLASSES: usize = 1024;
const ROW_BYTES: f64 = (CLASSES * 4 + 8) as f64;
const GIB: f64 = (1u64 << 30) as f64;
/// Input rows per generated file.
const ROWS_PER_FILE: usize = 250_000;
const BUCKET: &str = "bench-commit";
/// How often the coordinator looks for jobs to commit (often: the bench waits for it).
const FINALIZE_EVERY: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct Args {
    /// Output of the smaller job on local files, in GiB (the larger has `--factor` times as much).
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    #[arg(long, default_value_t = 8)]
    factor: u32,
    /// Output of the smaller job on the local S3 server, in GiB (0: skip S3).
    #[arg(long, default_value_t = 0.125)]
    s3_gib: f64,
    /// Skip local files.
    #[arg(long)]
    no_local: bool,
    /// Jobs run of each size; the median commit time counts (a commit takes milliseconds, so
    /// one measure is mostly noise).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[arg(long)]
    ort_lib: Option<std::path::PathBuf>,
}

pub async fn run(a: Args) -> Result<()> {
    nightshift_worker::onnx_runtime::load(a.ort_lib.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("wide.onnx");
    let classes = CLASSES.to_string();
    let m = model.to_str().unwrap_or_default();
    python(&[
        "gen_model.py",
        "--out",
        m,
        "--hidden",
        "16",
        "--classes",
        &classes,
    ])?;
    if !a.no_local {
        compare(tmp.path(), &model, &a, a.gib, None).await?;
    }
    if a.s3_gib > 0.0 {
        let s3 = S3Server::start().await?;
        s3.create_bucket(BUCKET).await?;
        compare(tmp.path(), &model, &a, a.s3_gib, Some(&s3)).await?;
    }
    Ok(())
}

/// Commits jobs of `gib` and of `factor` times as much, `repeat` times each; prints the median
/// commit time of each size and their ratio.
async fn compare(
    dir: &Path,
    model: &Path,
    a: &Args,
    gib: f64,
    s3: Option<&S3Server>,
) -> Result<()> {
    let place = if s3.is_some() {
        "local S3 server"
    } else {
        "local files"
    };
    let mut medians = Vec::new();
    for size in [gib, gib * f64::from(a.factor)] {
        let mut times = Vec::new();
        let mut shape = (0, 0);
        for run in 0..a.repeat.max(1) {
            let (took, files, bytes) = commit_time(dir, model, size, run, s3).await?;
            times.push(took);
            shape = (files, bytes);
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let all: Vec<String> = times.iter().map(|t| format!("{:.3}", t)).collect();
        println!(
            "{place:>15}: {:>6.2} GiB in {:>3} files, commit {median:>7.3} s (median of {})",
            shape.1 as f64 / GIB,
            shape.0,
            all.join(", ")
        );
        medians.push(median);
    }
    println!(
        "{place:>15}: commit time ratio {}x output / 1x: {:.2}",
        a.factor,
        medians[1] / medians[0]
    );
    Ok(())
}

/// Runs one job of about `gib` of output; answers its commit time, output files and bytes.
async fn commit_time(
    dir: &Path,
    model: &Path,
    gib: f64,
    run: u32,
    s3: Option<&S3Server>,
) -> Result<(f64, usize, u64)> {
    let rows = (gib * GIB / ROW_BYTES) as usize;
    let name = format!("commit-{rows}-{run}");
    let data = dir.join(format!("{name}-in"));
    let files = rows.div_ceil(ROWS_PER_FILE).max(1);
    let (rows_s, files_s) = (rows.to_string(), files.to_string());
    let d = data.to_str().unwrap_or_default();
    python(&[
        "gen_data.py",
        "--out",
        d,
        "--rows",
        &rows_s,
        "--files",
        &files_s,
    ])?;
    let (input, model_uri, output, stores) = match s3 {
        Some(s3) => {
            let prefix = format!("s3://{BUCKET}/{name}");
            s3.upload_dir(&data, &format!("{prefix}/in/")).await?;
            std::fs::remove_dir_all(&data)?;
            s3.put(&format!("{prefix}/m.onnx"), std::fs::read(model)?)
                .await?;
            let stores = Stores::new(s3.settings());
            let uris = (
                format!("{prefix}/in/*.parquet"),
                format!("{prefix}/m.onnx"),
                format!("{prefix}/out/"),
            );
            (uris.0, uris.1, uris.2, stores)
        }
        None => (
            format!("{}/*.parquet", data.display()),
            model.display().to_string(),
            dir.join(format!("{name}-out")).display().to_string(),
            Stores::default(),
        ),
    };
    let toml = format!(
        "name = \"{name}\"\n[input]\nuri = \"{input}\"\n[model]\nuri = \"{model_uri}\"\n\
         device = \"cpu\"\n[model.inputs]\nx = \"features\"\n[model.outputs]\nlogits = \"logits\"\n\
         [output]\nuri = \"{output}\"\npassthrough = [\"id\"]\n[shards]\nrows = 50000\n"
    );
    let spec = JobSpec::from_toml(&toml)?;
    let (took, files, bytes) = run_job(dir, &name, spec, Arc::new(stores)).await?;
    match s3 {
        // The next job gets the server's memory back.
        Some(s3) => {
            for uri in s3.list(&format!("s3://{BUCKET}/{name}/")).await? {
                s3.delete(&uri).await?;
            }
        }
        None => {
            std::fs::remove_dir_all(&data)?;
            std::fs::remove_dir_all(&output)?;
        }
    }
    Ok((took, files, bytes))
}

/// A coordinator on SQLite and one worker in this process run `spec`; answers its commit time,
/// and the manifest's file count and bytes.
async fn run_job(
    dir: &Path,
    name: &str,
    spec: JobSpec,
    stores: Arc<Stores>,
) -> Result<(f64, usize, u64)> {
    let db = dir.join(format!("{name}-state/db.sqlite"));
    let bench = BenchCoordinator::start(&db, stores.clone(), |c| {
        c.finalize_every = FINALIZE_EVERY;
    })
    .await?;
    let (service, url) = (bench.service.clone(), bench.url.clone());
    let worker = Worker::build(WorkerConfig::new(&url, "w"), stores.clone())?;
    let worker_stop = CancellationToken::new();
    let handle = tokio::spawn(worker.run(worker_stop.clone()));
    let job = service.submit(spec, None).await?.job;
    let output = job.output_uri.clone();
    loop {
        let view = service.get(&job.id.to_string()).await?;
        match view.state {
            JobState::Succeeded => break,
            s if s.is_terminal() => bail!("job {name} ended {s}: {:?}", view.error),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The coordinator's own measure: from reading the job's parts to recording it succeeded
    // (`nightshift_commit_seconds`), without the finalizer's tick or this loop's polling.
    let (commits, took) = service.metrics.commits.total();
    if commits != 1 {
        bail!("job {name} took {commits} commits, not one");
    }
    let took = took.as_secs_f64();
    let manifest_at = stores.locate(&format!("{}/_manifest.json", output.trim_end_matches('/')))?;
    let manifest: Manifest = serde_json::from_slice(&read_all(&manifest_at).await?)?;
    worker_stop.cancel();
    let _ = handle.await;
    bench.stop().await;
    let bytes = manifest.files.iter().map(|f| f.bytes).sum();
    Ok((took, manifest.files.len(), bytes))
}
