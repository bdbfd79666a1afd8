//! The transformer encoder workload of issue 10, for `nightshift-bench gpu`: a BERT-style
//! encoder of MiniLM-L6's shape (6 layers, hidden 384, 6 heads, intermediate 1536, a BERT
//! vocabulary) over pre-tokenized rows: `input_ids` and `attention_mask`, int64 lists of
//! `SEQ` tokens each (a real length, then zero padding), in float32 or float16.
//!
//! A job over token-id columns has no `[text]` table, so it cannot `pool` a `[batch, seq,
//! hidden]` output: the model is generated with `cls_embedding` (`[batch, hidden]`, the first
//! token's last hidden state) as its only output, and both sides run that same model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use nightshift_proto::{Device, JobSpec};
use nightshift_worker::onnx_runtime::OnnxRuntime;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::pipeline::{Job, python};
use crate::text::ENCODER;

/// Tokens per row, padding included.
const SEQ: usize = 128;
/// BERT's uncased WordPiece vocabulary, which MiniLM shares.
const VOCAB: usize = 30_522;
/// Input files the rows are spread over.
const FILES: usize = 8;
/// The shape (`ENCODER`, MiniLM-L6) in words, for reports.
pub const DESCRIPTION: &str = "6 layers, hidden 384, 6 heads, seq 128";
/// The model's only output, `[batch, hidden]`.
const OUTPUT: &str = "cls_embedding";

/// The float type of the encoder's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Float32,
    Float16,
}

impl Precision {
    /// As `gen_text_model.py --dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Float16 => "float16",
        }
    }
}

/// `rows` generated rows of tokens under `dir`.
pub fn generate_data(dir: &Path, rows: usize) -> Result<()> {
    let (rows, seq, vocab, files) = (
        rows.to_string(),
        SEQ.to_string(),
        VOCAB.to_string(),
        FILES.to_string(),
    );
    let d = dir.to_str().unwrap_or_default();
    let args = [
        "--out", d, "--rows", &rows, "--files", &files, "--seq", &seq, "--vocab", &vocab,
    ];
    python(&[&["gen_token_data.py"][..], &args[..]].concat())
}

/// The encoder at `precision`, generated as `dir/encoder-<precision>.onnx`.
pub fn generate_model(dir: &Path, precision: Precision) -> Result<PathBuf> {
    let model = dir.join(format!("encoder-{}.onnx", precision.name()));
    let (m, vocab) = (model.to_str().unwrap_or_default(), VOCAB.to_string());
    let args = [
        "--out",
        m,
        "--vocab-size",
        &vocab,
        "--cls-output",
        "--dtype",
        precision.name(),
    ];
    python(&[&["gen_text_model.py"][..], &args[..], &ENCODER[..]].concat())?;
    Ok(model)
}

/// Every row's token ids and attention mask, each `SEQ` values per row, row after row.
pub struct Tokens {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
}

impl Tokens {
    pub fn rows(&self) -> usize {
        self.ids.len() / SEQ
    }
}

/// The tokens of every Parquet file under `dir`.
pub fn load_tokens(dir: &Path) -> Result<Tokens> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    let mut tokens = Tokens {
        ids: Vec::new(),
        mask: Vec::new(),
    };
    for f in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&f)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            append_list(&batch, "input_ids", &mut tokens.ids)?;
            append_list(&batch, "attention_mask", &mut tokens.mask)?;
        }
    }
    Ok(tokens)
}

/// Appends the values of `batch`'s int64 list column `name`, which must hold `SEQ` per row.
fn append_list(batch: &arrow::array::RecordBatch, name: &str, out: &mut Vec<i64>) -> Result<()> {
    let col = batch
        .column_by_name(name)
        .with_context(|| format!("no `{name}` column"))?;
    let list = col.as_list::<i32>();
    let offsets = list.value_offsets();
    let (start, end) = (offsets[0] as usize, offsets[list.len()] as usize);
    if end - start != list.len() * SEQ {
        bail!("`{name}` does not hold {SEQ} tokens in every row");
    }
    let values = list.values().as_primitive::<Int64Type>();
    out.extend_from_slice(&values.values()[start..end]);
    Ok(())
}

/// Rows/s of a loop that builds each batch's `[n, SEQ]` int64 tensors from `tokens` and runs
/// the session on `device` (`cpu` or `cuda:N`). Outputs are discarded (the pipeline pools
/// nothing either: the model's output is one vector per row), and nothing is written.
pub fn bare_loop(
    runtime: &OnnxRuntime,
    model: &Path,
    tokens: &Tokens,
    batch: usize,
    device: Device,
) -> Result<f64> {
    let mut session = session(runtime, model, device)?;
    let rows = tokens.rows();
    if rows == 0 {
        bail!("no rows of tokens to run");
    }
    // One untimed call first (device memory, library handles): the pipeline is timed warm too,
    // its worker having run a warm-up job.
    run_batch(&mut session, tokens, 0, batch.min(rows))?;
    let started = Instant::now();
    for start in (0..rows).step_by(batch) {
        run_batch(&mut session, tokens, start, batch.min(rows - start))?;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// Builds the tensors of rows `start..start + n` and runs the session on them.
fn run_batch(session: &mut Session, tokens: &Tokens, start: usize, n: usize) -> Result<()> {
    let span = start * SEQ..(start + n) * SEQ;
    let shape = [n as i64, SEQ as i64];
    let ids = Tensor::from_array((shape, tokens.ids[span.clone()].to_vec()))?;
    let mask = Tensor::from_array((shape, tokens.mask[span].to_vec()))?;
    let out = session.run(ort::inputs!["input_ids" => ids, "attention_mask" => mask])?;
    std::hint::black_box(&out[OUTPUT]);
    Ok(())
}

/// A session on `device` as the pipeline bench's bare loop opens one (all graph
/// optimisations, ONNX Runtime's default threads; CUDA or an error, never a CPU fallback).
fn session(runtime: &OnnxRuntime, model: &Path, device: Device) -> Result<Session> {
    let ort_err = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow::anyhow!("{e}");
    let mut b = Session::builder(&runtime.env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(ort_err)?;
    if let Device::Cuda(n) = device {
        b = b
            .with_execution_providers([ort::ep::CUDA::default()
                .with_device_id(n as i32)
                .build()
                .error_on_failure()])
            .map_err(ort_err)?;
    }
    Ok(b.commit_from_file(model)?)
}

/// A job over `input` that feeds the token columns to the encoder on `device` in calls of
/// `batch` rows and stores `cls_embedding` as the `embedding` column (float16 for the float16
/// model), with the other settings at their defaults.
pub fn spec(
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
        &format!(
            "[model.inputs]\ninput_ids = \"input_ids\"\nattention_mask = \"attention_mask\"\n\
             [model.outputs]\n{OUTPUT} = \"embedding\"\n"
        ),
        &format!("[batch]\nsize = {batch}\n"),
    )
}
