//! The worker pipeline against a bare ONNX Runtime CUDA loop, on a GPU machine:
//!
//!   cargo run --release -p nightshift-bench -- gpu --ort-lib .../libonnxruntime.so.1.31.1
//!
//! The wide MLP of issue 10 (256 -> 4096 x3 -> 16, batch 4096) over generated rows: the bare
//! loop (features already in memory) and the pipeline (a coordinator and a worker with its
//! defaults in this process, `device = "auto"`), with the GPU's busy share sampled through NVML
//! during each. Where there is no GPU it says so and exits 0. (The transformer encoder of the
//! issue needs a model generator the project does not have yet; see the closing notes.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_proto::Device;
use nightshift_worker::gpus::{GpuMonitor, discover};
use nightshift_worker::model_session::cuda_provider_available;
use nightshift_worker::onnx_runtime;

use crate::pipeline::{bare_loop, bench_spec, load_features, pipeline, python};

/// How often GPU busy is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct Args {
    /// Rows of generated data.
    #[arg(long, default_value_t = 4_000_000)]
    rows: usize,
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    #[arg(long)]
    ort_lib: Option<std::path::PathBuf>,
}

pub async fn run(a: Args) -> Result<()> {
    let gpus = discover()?;
    let Some(gpu) = gpus.first() else {
        println!("gpu bench: no GPU here (no CUDA driver, or no device): nothing to measure");
        return Ok(());
    };
    let runtime = onnx_runtime::load(a.ort_lib.as_deref())?;
    if !cuda_provider_available() {
        bail!(
            "the ONNX Runtime at `{}` has no CUDA execution provider: point --ort-lib at the \
             onnxruntime-gpu wheel's libonnxruntime.so",
            runtime.library.display()
        );
    }
    println!(
        "gpu bench on {} ({} GiB, compute {}.{})",
        gpu.name,
        gpu.memory_bytes >> 30,
        gpu.compute_capability.0,
        gpu.compute_capability.1
    );
    let tmp = tempfile::tempdir()?;
    let (data, model) = (tmp.path().join("data"), tmp.path().join("wide.onnx"));
    let rows = a.rows.to_string();
    let d = data.to_str().unwrap_or_default();
    python(&[
        "gen_data.py",
        "--out",
        d,
        "--rows",
        &rows,
        "--files",
        "8",
        "--dim",
        "256",
    ])?;
    let m = model.to_str().unwrap_or_default();
    let shape = [
        "--dim",
        "256",
        "--hidden",
        "4096",
        "--layers",
        "3",
        "--classes",
        "16",
    ];
    python(&[&["gen_model.py", "--out", m], &shape[..]].concat())?;
    let (features, dim) = load_features(&data)?;
    let device = Device::Cuda(gpu.index);
    let (bare, bare_busy) = sampled(gpu.index, async {
        bare_loop(runtime, &model, &features, dim, a.batch, 0, device)
    })
    .await;
    let bare = bare?;
    let (piped, piped_busy) = sampled(gpu.index, async {
        let spec = |name: &str, input: &str, out: &std::path::Path| {
            bench_spec(name, input, &model, out, a.batch, Device::Auto)
        };
        pipeline(tmp.path(), &data, &spec, 0, 0, Device::Auto).await
    })
    .await;
    let piped = piped?;
    println!("wide MLP, {} rows, batch {}:", a.rows, a.batch);
    println!("  bare ORT-CUDA loop : {bare:>12.0} rows/s   GPU busy {bare_busy:>5.1}%");
    println!("  worker pipeline    : {piped:>12.0} rows/s   GPU busy {piped_busy:>5.1}%");
    println!("  ratio pipeline / bare: {:.3}", piped / bare);
    Ok(())
}

/// Runs `work` while a thread samples GPU `index`; answers its result and the mean busy %.
pub(crate) async fn sampled<T>(index: u32, work: impl Future<Output = T>) -> (T, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = std::thread::spawn(move || {
        let monitor = GpuMonitor::new();
        let mut seen = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            seen.extend(
                monitor
                    .sample(&[index])
                    .iter()
                    .map(|s| s.utilization_percent),
            );
            std::thread::sleep(SAMPLE_EVERY);
        }
        seen
    });
    let out = work.await;
    stop.store(true, Ordering::Relaxed);
    let seen = sampler.join().unwrap_or_default();
    let mean = seen.iter().map(|&p| f64::from(p)).sum::<f64>() / seen.len().max(1) as f64;
    (out, mean)
}
