//! Padding efficiency of text jobs (real tokens / padded tokens the model runs over): texts
//! whose token lengths spread like real sentences (log-normal, median about 30 tokens, cut at
//! 512) are cut into model calls as a `[text]` job cuts them by default (windows of several
//! calls, rows grouped by length, a token budget per call), and, as the baseline, into
//! fixed-size row batches in input order, each padded to its longest row.
//!
//!   cargo run --release -p nightshift-bench -- padding

use anyhow::{Context, Result};
use arrow::array::AsArray;
use nightshift_worker::text::{self, DEFAULT_MAX_TOKENS, WINDOW_CALLS};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::pipeline::python;

/// Rows per model call a text job uses unless its spec says otherwise (`batch.size`).
const CALL_ROWS: usize = nightshift_proto::DEFAULT_BATCH_ROWS as usize;
const MAX_LENGTH: u32 = 512;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Median words per text (about 1.4 tokens each with the generated tokenizer).
    #[arg(long, default_value_t = 17)]
    median_words: u32,
    /// Fixed-size baselines, rows per batch.
    #[arg(long, value_delimiter = ',', default_value = "32,256,1024")]
    fixed: Vec<usize>,
}

pub async fn run(a: Args) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (tokenizer, data) = generate_texts(tmp.path(), a.rows, a.median_words, 1)?;
    let lengths = token_lengths(&tokenizer, &data.join("part-00000.parquet"))?;
    let real: u64 = lengths.iter().map(|&l| l as u64).sum();
    let mut sorted = lengths.clone();
    sorted.sort_unstable();
    println!(
        "padding: {} texts, tokens per text median {}, p99 {}, max {} (cut at {MAX_LENGTH})",
        lengths.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() * 99 / 100],
        sorted[sorted.len() - 1]
    );
    let ours = grouped(&lengths);
    println!(
        "padding: nightshift (windows of {} rows, calls of <= {CALL_ROWS} rows and <= {DEFAULT_MAX_TOKENS} tokens): efficiency {:.3}",
        WINDOW_CALLS * CALL_ROWS,
        real as f64 / ours as f64
    );
    for rows in a.fixed {
        let padded: u64 = (lengths.chunks(rows))
            .map(|c| (c.len() * c.iter().max().copied().unwrap_or(0)) as u64)
            .sum();
        println!(
            "padding: fixed batches of {rows} rows in input order: efficiency {:.3}; nightshift pads {:.2}x fewer tokens",
            real as f64 / padded as f64,
            padded as f64 / ours as f64
        );
    }
    Ok(())
}

/// A generated tokenizer and `rows` texts (log-normal lengths) in `files` files under `dir`.
pub(crate) fn generate_texts(
    dir: &std::path::Path,
    rows: u64,
    median_words: u32,
    files: u32,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (tokenizer, data) = (dir.join("tokenizer.json"), dir.join("texts"));
    python(&[
        "gen_tokenizer.py",
        "--out",
        tokenizer.to_str().unwrap_or_default(),
    ])?;
    let (rows, words, files) = (
        rows.to_string(),
        median_words.to_string(),
        files.to_string(),
    );
    let d = data.to_str().unwrap_or_default();
    let args = [
        "--out",
        d,
        "--rows",
        &rows,
        "--median-words",
        &words,
        "--files",
        &files,
    ];
    python(&[&["gen_text_data.py"][..], &args[..]].concat())?;
    Ok((tokenizer, data))
}

/// Padded tokens when windows of rows are cut into calls as a text job cuts them.
fn grouped(lengths: &[usize]) -> u64 {
    lengths
        .chunks(WINDOW_CALLS * CALL_ROWS)
        .map(|window| {
            let rows: Vec<u32> = (0..window.len() as u32).collect();
            text::calls(&rows, window, CALL_ROWS, DEFAULT_MAX_TOKENS)
                .iter()
                .map(|c| text::padded_tokens(c, window))
                .sum::<u64>()
        })
        .sum()
}

/// Each text's token count, special tokens included, cut at `MAX_LENGTH`.
fn token_lengths(tokenizer: &std::path::Path, file: &std::path::Path) -> Result<Vec<usize>> {
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("loading the tokenizer: {e}"))?;
    let tokenizer = text::truncating(&tokenizer, MAX_LENGTH).map_err(anyhow::Error::msg)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file)?)?.build()?;
    let mut lengths = Vec::new();
    for batch in reader {
        let batch = batch?;
        let body = batch.column_by_name("body").context("no `body` column")?;
        let texts: Vec<&str> = body.as_string::<i32>().iter().flatten().collect();
        let encodings = tokenizer
            .encode_batch(texts, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        lengths.extend(encodings.iter().map(|e| e.get_ids().len()));
    }
    Ok(lengths)
}
