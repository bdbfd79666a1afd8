//! `[text]` jobs: a string column becomes token tensors in the worker. A read window is
//! tokenized at once (truncated to `max_length`), its rows are grouped by token length, and
//! each model call takes rows of similar length, padded only to its own longest row and capped
//! by `batch.max_tokens`; the outputs are put back in input order after the calls.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Builder, ListBuilder};
use arrow::datatypes::DataType;
use arrow_array::RecordBatch;
use arrow_schema::{Field, Schema};
use nightshift_proto::{TextField, TextSpec};
use tokenizers::{Tokenizer, TruncationParams};

use crate::shard_error::ShardError;

/// Rows a text job reads at once, in model calls: the window its rows are grouped by length in.
pub const WINDOW_CALLS: usize = 8;
/// Padded tokens per model call of a text job whose spec sets no `batch.max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 32_768;

/// Tokens of one read window: how many were real, and how many texts were cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenStats {
    pub real_tokens: u64,
    pub padded_tokens: u64,
    pub truncated_rows: u64,
}

impl TokenStats {
    pub fn add(&mut self, other: TokenStats) {
        self.real_tokens += other.real_tokens;
        self.padded_tokens += other.padded_tokens;
        self.truncated_rows += other.truncated_rows;
    }
}

/// A tokenizer set to truncate at `max_length` tokens, special tokens included.
pub fn truncating(tokenizer: &Tokenizer, max_length: u32) -> Result<Tokenizer, String> {
    let mut t = tokenizer.clone();
    t.with_truncation(Some(TruncationParams {
        max_length: max_length as usize,
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    t.with_padding(None);
    Ok(t)
}

/// `batch` with the text column's token tensors appended as `List<Int64>` columns named
/// `<column>.input_ids`, `.attention_mask` and `.token_type_ids` (null where the text is),
/// and how many texts were cut at `max_length`.
pub fn tokenize(
    batch: &RecordBatch,
    text: &TextSpec,
    tokenizer: &Tokenizer,
) -> Result<(RecordBatch, TokenStats), ShardError> {
    let col = batch
        .column_by_name(&text.column)
        .ok_or_else(|| ShardError::Internal(format!("column `{}` missing", text.column)))?;
    let texts = strings(col)?;
    let present: Vec<&str> = texts.iter().flatten().copied().collect();
    let encodings = tokenizer
        .encode_batch(present, true)
        .map_err(|e| ShardError::Inference(format!("tokenizing `{}`: {e}", text.column)))?;
    let mut builders: Vec<ListBuilder<Int64Builder>> = (0..TextField::ALL.len())
        .map(|_| ListBuilder::new(Int64Builder::new()))
        .collect();
    let mut stats = TokenStats::default();
    let mut next = encodings.iter();
    for t in &texts {
        let Some(e) = t.and_then(|_| next.next()) else {
            builders.iter_mut().for_each(|b| b.append_null());
            continue;
        };
        stats.real_tokens += e.get_ids().len() as u64;
        stats.truncated_rows += u64::from(!e.get_overflowing().is_empty());
        let fields: [&[u32]; 3] = [e.get_ids(), e.get_attention_mask(), e.get_type_ids()];
        for (b, values) in builders.iter_mut().zip(fields) {
            b.values()
                .extend(values.iter().map(|&v| Some(i64::from(v))));
            b.append(true);
        }
    }
    let mut fields: Vec<Arc<Field>> = batch.schema().fields().iter().cloned().collect();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    for (field, mut b) in TextField::ALL.into_iter().zip(builders) {
        let array: ArrayRef = Arc::new(b.finish());
        fields.push(Arc::new(Field::new(
            text.carrier(field),
            array.data_type().clone(),
            true,
        )));
        columns.push(array);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| ShardError::Internal(e.to_string()))?;
    Ok((batch, stats))
}

fn strings(col: &ArrayRef) -> Result<Vec<Option<&str>>, ShardError> {
    Ok(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().iter().collect(),
        DataType::LargeUtf8 => col.as_string::<i64>().iter().collect(),
        DataType::Utf8View => col.as_string_view().iter().collect(),
        other => {
            return Err(ShardError::Internal(format!(
                "[text] column holds {other}, not strings"
            )));
        }
    })
}

/// Each row's token count (its attention mask's length; 0 for a null text).
pub fn token_lengths(batch: &RecordBatch, text: &TextSpec) -> Vec<usize> {
    let Some(col) = batch.column_by_name(&text.carrier(TextField::AttentionMask)) else {
        return vec![0; batch.num_rows()];
    };
    let lists = col.as_list::<i32>();
    (0..lists.len())
        .map(|r| {
            if lists.is_null(r) {
                0
            } else {
                lists.value_length(r) as usize
            }
        })
        .collect()
}

/// A call ends before a row longer than its shortest row times `SPREAD_NUM / SPREAD_DEN`
/// plus `SPREAD_SLACK` tokens, so no call pads its rows by more than about a fifth.
const SPREAD_NUM: usize = 6;
const SPREAD_DEN: usize = 5;
const SPREAD_SLACK: usize = 4;

/// Model calls over `rows` (indices into a batch whose rows have `lengths` tokens): rows sorted
/// by length and cut into runs of similar length, at most `max_rows` and `max_tokens` padded
/// tokens (rows x the call's longest row) per call, each call's rows in ascending length. A
/// row longer than `max_tokens` alone is a call of its own.
pub fn calls(rows: &[u32], lengths: &[usize], max_rows: usize, max_tokens: u64) -> Vec<Vec<u32>> {
    let mut sorted = rows.to_vec();
    sorted.sort_by_key(|&r| (lengths[r as usize], r));
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut call: Vec<u32> = Vec::new();
    for r in sorted {
        // Sorted ascending: this row is the call's longest if it joins, the first its shortest.
        let len = lengths[r as usize];
        let longest = len.max(1) as u64;
        let shortest = call.first().map_or(len, |&f| lengths[f as usize]);
        let spread = len * SPREAD_DEN > shortest * SPREAD_NUM + SPREAD_SLACK * SPREAD_DEN;
        let full = spread
            || call.len() >= max_rows.max(1)
            || (call.len() as u64 + 1) * longest > max_tokens;
        if full && !call.is_empty() {
            out.push(std::mem::take(&mut call));
        }
        call.push(r);
    }
    if !call.is_empty() {
        out.push(call);
    }
    out
}

/// Padded tokens of a call: its rows times its longest row.
pub fn padded_tokens(call: &[u32], lengths: &[usize]) -> u64 {
    let longest = call.iter().map(|&r| lengths[r as usize]).max().unwrap_or(0);
    (call.len() * longest) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_group_similar_lengths_within_both_caps() {
        let lengths = [5, 100, 7, 6, 90, 1, 300];
        let rows: Vec<u32> = (0..7).collect();
        let got = calls(&rows, &lengths, 3, 200);
        assert_eq!(got, vec![vec![5, 0], vec![3, 2], vec![4, 1], vec![6]]);
        // Every row once.
        let mut all: Vec<u32> = got.concat();
        all.sort();
        assert_eq!(all, rows);
        for call in &got {
            assert!(call.len() <= 3);
            assert!(
                call.len() == 1 || padded_tokens(call, &lengths) <= 200,
                "{call:?}"
            );
        }
    }

    #[test]
    fn sorting_cuts_padding() {
        // Lengths that alternate short and long: in input order every call pads to the long.
        let lengths: Vec<usize> = (0..64).map(|i| if i % 2 == 0 { 10 } else { 100 }).collect();
        let rows: Vec<u32> = (0..64).collect();
        let real: usize = lengths.iter().sum();
        let padded: u64 = calls(&rows, &lengths, 16, u64::MAX)
            .iter()
            .map(|c| padded_tokens(c, &lengths))
            .sum();
        assert_eq!(
            padded as usize, real,
            "sorted calls hold rows of one length each"
        );
        let in_order: u64 = rows.chunks(16).map(|c| padded_tokens(c, &lengths)).sum();
        assert!(in_order as usize > real);
    }
}
