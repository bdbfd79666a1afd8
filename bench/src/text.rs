//! Text embedding on a GPU machine: a MiniLM-shaped encoder (6 layers, hidden 384) over texts
//! whose lengths spread like real sentences, through the worker pipeline (`[text]`, mean
//! pooling, normalised, default batching) against the usual Python way (Hugging Face
//! `tokenizers`, a length sort, ONNX Runtime CUDA at batch 256, `scripts/text_baseline.py`), with
//! the GPU's busy share sampled during each.
//!
//!   cargo run --release -p nightshift-bench -- text --ort-lib .../libonnxruntime.so.1.31.1
//!
//! Where there is no GPU it says so and exits 0; `--cpu` runs both on the CPU (a smoke run).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nightshift_proto::{Device, JobSpec};
use nightshift_worker::gpus::discover;
use nightshift_worker::model_session::cuda_provider_available;
use nightshift_worker::onnx_runtime;

use crate::gpu::sampled;
use crate::padding::generate_texts;
use crate::pipeline::{pipeline, python, python_output};

/// Input files the texts are spread over.
const TEXT_FILES: u32 = 4;
/// The encoder's shape: MiniLM-L6.
pub(crate) const ENCODER: [&str; 8] = [
    "--hidden",
    "384",
    "--layers",
    "6",
    "--heads",
    "6",
    "--intermediate",
    "1536",
];

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Median words per text (about 30 tokens with the generated tokenizer).
    #[arg(long, default_value_t = 17)]
    median_words: u32,
    /// Rows per batch of the Python baseline.
    #[arg(long, default_value_t = 256)]
    baseline_batch: u32,
    /// Run both on the CPU (no GPU needed).
    #[arg(long)]
    cpu: bool,
    #[arg(long)]
    ort_lib: Option<std::path::PathBuf>,
}

pub async fn run(a: Args) -> Result<()> {
    let runtime = onnx_runtime::load(a.ort_lib.as_deref())?;
    let gpu = match (a.cpu, discover()?.first()) {
        (true, _) => None,
        (false, Some(gpu)) => Some(gpu.index),
        (false, None) => {
            println!(
                "text bench: no GPU here (no CUDA driver, or no device); --cpu runs it on the CPU"
            );
            return Ok(());
        }
    };
    if gpu.is_some() && !cuda_provider_available() {
        bail!(
            "the ONNX Runtime at `{}` has no CUDA execution provider",
            runtime.library.display()
        );
    }
    let tmp = tempfile::tempdir()?;
    let (tokenizer, model, data) = generate(tmp.path(), &a)?;
    let (t, m) = (
        tokenizer.to_str().unwrap_or_default(),
        model.to_str().unwrap_or_default(),
    );
    let input = format!("{}/*.parquet", data.display());
    let baseline_out = tmp.path().join("baseline/out.parquet");
    let device = if gpu.is_some() { "cuda" } else { "cpu" };
    let batch = a.baseline_batch.to_string();
    let args = [
        "text_baseline.py",
        "--tokenizer",
        t,
        "--model",
        m,
        "--input",
        &input,
        "--output",
        baseline_out.to_str().unwrap_or_default(),
        "--batch",
        &batch,
        "--device",
        device,
    ];
    let (line, base_busy) = sampled(gpu.unwrap_or(0), async { python_output(&args) }).await;
    let line: serde_json::Value = serde_json::from_str(line?.trim()).context("baseline output")?;
    let base = line["rows_per_s"].as_f64().context("baseline rows/s")?;
    let device = gpu.map_or(Device::Cpu, Device::Cuda);
    let spec = |name: &str, input: &str, out: &Path| {
        text_spec(name, input, &tokenizer, &model, out, device)
    };
    let (piped, piped_busy) = sampled(
        gpu.unwrap_or(0),
        pipeline(tmp.path(), &data, &spec, 0, 0, device),
    )
    .await;
    let piped = piped?;
    println!(
        "text bench: {} texts, MiniLM-shaped encoder, {device}:",
        a.rows
    );
    // GPU busy only means something on a GPU.
    let busy = |b: f64| gpu.map_or(String::new(), |_| format!("   GPU busy {b:>5.1}%"));
    println!(
        "  Python (tokenizers + sort + ORT, batch {}) : {base:>10.0} texts/s{}",
        a.baseline_batch,
        busy(base_busy)
    );
    println!(
        "  worker pipeline ([text] defaults)        : {piped:>10.0} texts/s{}",
        busy(piped_busy)
    );
    println!("  ratio pipeline / Python: {:.2}", piped / base);
    Ok(())
}

/// The tokenizer, the encoder and the texts, generated.
fn generate(dir: &Path, a: &Args) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let (tokenizer, data) = generate_texts(dir, a.rows, a.median_words, TEXT_FILES)?;
    let model = dir.join("encoder.onnx");
    let (t, m) = (
        tokenizer.to_str().unwrap_or_default(),
        model.to_str().unwrap_or_default(),
    );
    python(
        &[
            &["gen_text_model.py", "--tokenizer", t, "--out", m][..],
            &ENCODER[..],
        ]
        .concat(),
    )?;
    Ok((tokenizer, model, data))
}

fn text_spec(
    name: &str,
    input: &str,
    tokenizer: &Path,
    model: &Path,
    out: &Path,
    device: Device,
) -> Result<JobSpec> {
    let toml = format!(
        "name = \"{name}\"\n[input]\nuri = \"{input}\"\n[text]\ncolumn = \"body\"\ntokenizer = \"{}\"\n\
         [model]\nuri = \"{}\"\ndevice = \"{device}\"\n[model.inputs]\ninput_ids = \"body.input_ids\"\n\
         attention_mask = \"body.attention_mask\"\n[model.outputs]\n\
         last_hidden_state = {{ column = \"embedding\", pool = \"mean\", normalize = true }}\n\
         [output]\nuri = \"{}\"\npassthrough = [\"id\"]\n[shards]\nrows = 50000\n",
        tokenizer.display(),
        model.display(),
        out.display()
    );
    Ok(JobSpec::from_toml(&toml)?)
}
