//! The worker pipeline against a bare ONNX Runtime CUDA loop, on a GPU machine:
//!
//!   cargo run --release -p nightshift-bench -- gpu --ort-lib .../libonnxruntime.so.1.31.1
//!
//! The two workloads of issue 10, over generated rows: the wide MLP (256 -> 4096 x3 -> 16,
//! batch 4096) and the transformer encoder (6 layers, hidden 384, seq 128, int64 `input_ids`
//! and `attention_mask`, batch 256; see `encoder.rs`) in float32 and in float16. For each, the
//! bare loop (inputs already in memory) and the pipeline (a coordinator and a worker with its
//! defaults in this process, the worker's slot on the GPU and the job's `device = "auto"`),
//! with the GPU's busy share sampled through NVML during each. Where there is no GPU it says so
//! and exits 0; `--cpu-check` runs the same workloads on the CPU (small `--rows` and
//! `--encoder-rows` make it quick) to exercise the code without one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use nightshift_proto::Device;
use nightshift_worker::gpus::{GpuMonitor, discover};
use nightshift_worker::model_session::cuda_provider_available;
use nightshift_worker::onnx_runtime::{self, OnnxRuntime};

use crate::encoder::{self, Precision, Tokens};
use crate::pipeline::{bare_loop, bench_spec, load_features, pipeline, python};

/// How often GPU busy is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The wide MLP's input files and features per row.
const MLP_FILES: &str = "8";
const MLP_DIM: &str = "256";
/// The wide MLP's shape after its input: 3 hidden layers of 4096, 16 outputs.
const MLP_SHAPE: [&str; 6] = ["--hidden", "4096", "--layers", "3", "--classes", "16"];

/// What the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// The wide MLP, float32.
    Mlp,
    /// The transformer encoder, float32.
    Encoder,
    /// The transformer encoder, float16.
    EncoderFp16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Rows of generated data for the MLP.
    #[arg(long, default_value_t = 4_000_000)]
    rows: usize,
    /// Rows per model call for the MLP.
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Rows of generated tokens for the encoder.
    #[arg(long, default_value_t = 800_000)]
    encoder_rows: usize,
    /// Rows per model call for the encoder.
    #[arg(long, default_value_t = 256)]
    encoder_batch: usize,
    /// The workloads to measure, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mlp,encoder,encoder-fp16"
    )]
    workloads: Vec<Workload>,
    /// Run the workloads on the CPU instead (no GPU needed; no GPU busy): checks the code.
    #[arg(long)]
    cpu_check: bool,
    #[arg(long)]
    ort_lib: Option<std::path::PathBuf>,
}

/// Where the bench runs: GPU `index`, or the CPU (`--cpu-check`).
#[derive(Debug, Clone, Copy)]
enum Target {
    Gpu(u32),
    Cpu,
}

impl Target {
    /// The bare loops' device, and the worker slot's (its job says `auto`, which takes it).
    fn device(self) -> Device {
        match self {
            Target::Gpu(n) => Device::Cuda(n),
            Target::Cpu => Device::Cpu,
        }
    }
}

/// What one workload's run shares: ONNX Runtime, the target, a scratch directory.
struct Bench<'a> {
    runtime: &'static OnnxRuntime,
    target: Target,
    dir: &'a Path,
}

pub async fn run(a: Args) -> Result<()> {
    let Some(target) = target(&a)? else {
        println!("gpu bench: no GPU here (no CUDA driver, or no device): nothing to measure");
        return Ok(());
    };
    let runtime = onnx_runtime::load(a.ort_lib.as_deref())?;
    if matches!(target, Target::Gpu(_)) && !cuda_provider_available() {
        bail!(
            "the ONNX Runtime at `{}` has no CUDA execution provider: point --ort-lib at the \
             onnxruntime-gpu wheel's libonnxruntime.so",
            runtime.library.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let bench = Bench {
        runtime,
        target,
        dir: tmp.path(),
    };
    if a.workloads.contains(&Workload::Mlp) {
        mlp(&bench, &a).await?;
    }
    encoders(&bench, &a).await
}

/// The encoder workloads asked for, over one set of generated tokens.
async fn encoders(b: &Bench<'_>, a: &Args) -> Result<()> {
    let precisions: Vec<Precision> = (a.workloads.iter())
        .filter_map(|w| match w {
            Workload::Mlp => None,
            Workload::Encoder => Some(Precision::Float32),
            Workload::EncoderFp16 => Some(Precision::Float16),
        })
        .collect();
    if precisions.is_empty() {
        return Ok(());
    }
    let data = b.dir.join("tokens");
    encoder::generate_data(&data, a.encoder_rows)?;
    let tokens = encoder::load_tokens(&data)?;
    for precision in precisions {
        encoder_run(b, a, &data, &tokens, precision).await?;
    }
    Ok(())
}

/// The CPU for `--cpu-check`, else the first GPU (saying which), or `None` without one.
fn target(a: &Args) -> Result<Option<Target>> {
    if a.cpu_check {
        println!("gpu bench, --cpu-check: the workloads on the CPU (no GPU busy)");
        return Ok(Some(Target::Cpu));
    }
    let gpus = discover()?;
    let Some(gpu) = gpus.first() else {
        return Ok(None);
    };
    println!(
        "gpu bench on {} ({} GiB, compute {}.{})",
        gpu.name,
        gpu.memory_bytes >> 30,
        gpu.compute_capability.0,
        gpu.compute_capability.1
    );
    Ok(Some(Target::Gpu(gpu.index)))
}

/// The wide MLP: generated rows and model, the bare loop, then the pipeline.
async fn mlp(b: &Bench<'_>, a: &Args) -> Result<()> {
    let dir = b.dir.join("mlp");
    let (data, model) = (dir.join("data"), dir.join("wide.onnx"));
    let rows = a.rows.to_string();
    let (d, m) = (
        data.to_str().unwrap_or_default(),
        model.to_str().unwrap_or_default(),
    );
    let args = [
        "--out", d, "--rows", &rows, "--files", MLP_FILES, "--dim", MLP_DIM,
    ];
    python(&[&["gen_data.py"][..], &args[..]].concat())?;
    let args = ["--out", m, "--dim", MLP_DIM];
    python(&[&["gen_model.py"][..], &args[..], &MLP_SHAPE[..]].concat())?;
    let (features, dim) = load_features(&data)?;
    let device = b.target.device();
    let bare = || bare_loop(b.runtime, &model, &features, dim, a.batch, 0, device);
    let spec = |name: &str, input: &str, out: &Path| {
        bench_spec(name, input, &model, out, a.batch, Device::Auto)
    };
    let m = measure(b.target, bare, pipeline(&dir, &data, &spec, 0, 0, device)).await?;
    m.print(
        &format!("wide MLP, {} rows, batch {}", a.rows, a.batch),
        b.target,
    );
    Ok(())
}

/// The encoder at `precision` over the generated `tokens` (also in `data`): its model, the
/// bare loop, then the pipeline.
async fn encoder_run(
    b: &Bench<'_>,
    a: &Args,
    data: &Path,
    tokens: &Tokens,
    precision: Precision,
) -> Result<()> {
    let dir = b.dir.join(format!("encoder-{}", precision.name()));
    let model = encoder::generate_model(&dir, precision)?;
    let device = b.target.device();
    let bare = || encoder::bare_loop(b.runtime, &model, tokens, a.encoder_batch, device);
    let spec = |name: &str, input: &str, out: &Path| {
        encoder::spec(name, input, &model, out, a.encoder_batch, Device::Auto)
    };
    let m = measure(b.target, bare, pipeline(&dir, data, &spec, 0, 0, device)).await?;
    let title = format!(
        "transformer encoder {} ({}), {} rows, batch {}",
        precision.name(),
        encoder::DESCRIPTION,
        tokens.rows(),
        a.encoder_batch
    );
    m.print(&title, b.target);
    Ok(())
}

/// Rows/s of the bare loop and of the pipeline, and the mean GPU busy % during each.
struct Measured {
    bare: (f64, f64),
    piped: (f64, f64),
}

/// Runs `bare`, then `piped`, each with the target's GPU sampled.
async fn measure(
    target: Target,
    bare: impl FnOnce() -> Result<f64>,
    piped: impl Future<Output = Result<f64>>,
) -> Result<Measured> {
    let index = match target {
        Target::Gpu(n) => n,
        Target::Cpu => 0,
    };
    let (bare, bare_busy) = sampled(index, async { bare() }).await;
    let bare = (bare?, bare_busy);
    let (piped, piped_busy) = sampled(index, piped).await;
    Ok(Measured {
        bare,
        piped: (piped?, piped_busy),
    })
}

impl Measured {
    fn print(&self, title: &str, target: Target) {
        let ((bare, bare_busy), (piped, piped_busy)) = (self.bare, self.piped);
        let (bare_name, busy): (&str, fn(f64) -> String) = match target {
            Target::Gpu(_) => ("bare ORT-CUDA loop", |b| format!("   GPU busy {b:>5.1}%")),
            // GPU busy means nothing on the CPU.
            Target::Cpu => ("bare ORT-CPU loop", |_| String::new()),
        };
        println!("{title}:");
        println!("  {bare_name:<18} : {bare:>12.0} rows/s{}", busy(bare_busy));
        println!(
            "  worker pipeline    : {piped:>12.0} rows/s{}",
            busy(piped_busy)
        );
        println!("  ratio pipeline / bare: {:.3}", piped / bare);
    }
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
