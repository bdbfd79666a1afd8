//! Stages 2 and 3: prepare tensors (find rows that cannot feed the model, stack the rest) on
//! blocking threads, and run the model on the slot's executor thread, which owns the session. A batch the
//! model rejects is split in halves until the rows it rejects are found; those become poison
//! rows and the rest goes on.

use std::sync::Arc;

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::{concat, take, take_record_batch};
use arrow_array::RecordBatch;
use nightshift_signature::TensorPlan;
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::model_session::{ModelSession, RunError};
use crate::pipeline::reader::InputBatch;
use crate::shard_error::ShardError;
use crate::tensors::{TensorInput, input_tensors, row_problems};
use crate::text::{self, TokenStats, token_lengths, tokenize};

/// Why a row went to `_errors/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// Row index within its batch.
    pub row: usize,
    /// `data` (cannot become a tensor) or `model` (the model rejects it).
    pub class: &'static str,
    pub message: String,
}

/// A batch ready for the model: its rows that can feed it, as model calls with their tensors.
pub struct Prepared {
    pub start: u64,
    /// The batch as read, with a text job's token columns appended.
    pub input: RecordBatch,
    /// Columns of the batch as read (the token columns come after them).
    pub columns: usize,
    pub calls: Vec<Call>,
    pub errors: Vec<RowError>,
    pub tokens: TokenStats,
}

/// Rows of a batch run by one model call (in the call's order), and their tensors.
pub struct Call {
    pub rows: Vec<u32>,
    pub tensors: Vec<TensorInput>,
    /// Each row's real tokens (text jobs): what pooling averages over.
    pub lengths: Option<Vec<usize>>,
}

/// A batch after the model.
pub struct Inferred {
    pub start: u64,
    pub input: RecordBatch,
    /// Rows with outputs (None: all of them), in order.
    pub kept: Option<Vec<u32>>,
    pub outputs: Vec<ArrayRef>,
    pub errors: Vec<RowError>,
    /// The session's row limit after this batch (`None`: no limit met).
    pub row_limit: Option<usize>,
    pub tokens: TokenStats,
}

/// How a text job cuts its read windows into model calls.
#[derive(Clone)]
pub struct TextCalls {
    pub tokenizer: Arc<Tokenizer>,
    pub max_rows: usize,
    pub max_tokens: u64,
}

/// Finds rows that cannot become tensors and builds the tensors of the rest: one call in row
/// order, or (text jobs) calls of rows of similar token length.
pub fn prepare(
    b: InputBatch,
    plan: &TensorPlan,
    text: Option<&TextCalls>,
) -> Result<Prepared, ShardError> {
    let columns = b.batch.num_columns();
    let text = text.zip(plan.text.as_ref());
    let (input, mut tokens) = match text {
        Some((t, spec)) => tokenize(&b.batch, spec, &t.tokenizer)?,
        None => (b.batch, TokenStats::default()),
    };
    let problems = row_problems(&input, &plan.inputs);
    let mut bad = problems.iter().map(|p| p.row).peekable();
    let good: Vec<u32> = (0..input.num_rows())
        .filter(|r| {
            let is_bad = bad.peek() == Some(r);
            if is_bad {
                bad.next();
            }
            !is_bad
        })
        .map(|r| r as u32)
        .collect();
    let groups = match text {
        Some((t, spec)) => {
            let lengths = token_lengths(&input, spec);
            let groups = text::calls(&good, &lengths, t.max_rows, t.max_tokens);
            tokens.padded_tokens = groups
                .iter()
                .map(|g| text::padded_tokens(g, &lengths))
                .sum();
            groups
        }
        _ if good.is_empty() => Vec::new(),
        _ => vec![good],
    };
    let whole = problems.is_empty() && text.is_none();
    let calls = groups
        .into_iter()
        .map(|rows| call(&input, plan, rows, whole))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        start: b.start,
        input,
        columns,
        calls,
        errors: problems
            .into_iter()
            .map(|p| RowError {
                row: p.row,
                class: "data",
                message: p.message,
            })
            .collect(),
        tokens,
    })
}

/// A call over `rows` of `input` (`whole`: they are all its rows, in order).
fn call(
    input: &RecordBatch,
    plan: &TensorPlan,
    rows: Vec<u32>,
    whole: bool,
) -> Result<Call, ShardError> {
    let taken;
    let batch = if whole {
        input
    } else {
        taken = take_rows(input, &rows)?;
        &taken
    };
    Ok(Call {
        tensors: input_tensors(batch, &plan.inputs)?,
        lengths: plan.text.as_ref().map(|t| token_lengths(batch, t)),
        rows,
    })
}

pub fn take_rows(batch: &RecordBatch, rows: &[u32]) -> Result<RecordBatch, ShardError> {
    take_record_batch(batch, &UInt32Array::from(rows.to_vec()))
        .map_err(|e| ShardError::Internal(e.to_string()))
}

/// Runs every prepared batch of one shard on the executor's thread, until the input channel
/// closes, the shard stops listening or a batch fails.
pub fn infer_loop(
    session: &mut ModelSession,
    plan: &TensorPlan,
    mut rx: mpsc::Receiver<Result<Prepared, ShardError>>,
    tx: mpsc::Sender<Result<Inferred, ShardError>>,
) {
    while let Some(item) = rx.blocking_recv() {
        let out = item.and_then(|p| infer(session, plan, p));
        let failed = out.is_err();
        if tx.blocking_send(out).is_err() || failed {
            break;
        }
    }
}

/// What one call gave: the rows with outputs (batch rows), their outputs, the rows rejected.
struct Ran {
    kept: Vec<u32>,
    outputs: Vec<ArrayRef>,
    rejected: Vec<RowError>,
}

fn infer(
    session: &mut ModelSession,
    plan: &TensorPlan,
    p: Prepared,
) -> Result<Inferred, ShardError> {
    let rows = p.input.num_rows();
    let mut errors = p.errors;
    let mut ran = Vec::with_capacity(p.calls.len());
    for call in p.calls {
        let r = run_call(session, plan, &p.input, call)?;
        errors.extend(r.rejected.iter().cloned());
        ran.push(r);
    }
    errors.sort_by_key(|e| e.row);
    let (kept, outputs) = in_row_order(plan, ran)?;
    let input = p
        .input
        .project(&(0..p.columns).collect::<Vec<_>>())
        .map_err(|e| ShardError::Internal(e.to_string()))?;
    Ok(Inferred {
        start: p.start,
        input,
        kept: (kept.len() != rows).then_some(kept),
        outputs,
        errors,
        row_limit: session.row_limit,
        tokens: p.tokens,
    })
}

/// The calls' outputs as one set in row order.
fn in_row_order(plan: &TensorPlan, ran: Vec<Ran>) -> Result<(Vec<u32>, Vec<ArrayRef>), ShardError> {
    let kept: Vec<u32> = ran.iter().flat_map(|r| r.kept.iter().copied()).collect();
    let outputs = (0..plan.outputs.len())
        .map(|k| {
            let parts: Vec<&dyn arrow::array::Array> =
                ran.iter().map(|r| r.outputs[k].as_ref()).collect();
            match parts.len() {
                0 => Ok(empty_outputs(plan)[k].clone()),
                1 => Ok(ran[0].outputs[k].clone()),
                _ => concat(&parts).map_err(|e| ShardError::Internal(e.to_string())),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if kept.is_sorted() {
        return Ok((kept, outputs));
    }
    let mut order: Vec<u32> = (0..kept.len() as u32).collect();
    order.sort_by_key(|&i| kept[i as usize]);
    let order = UInt32Array::from(order);
    let outputs = outputs
        .iter()
        .map(|o| take(o.as_ref(), &order, None).map_err(|e| ShardError::Internal(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut kept = kept;
    kept.sort_unstable();
    Ok((kept, outputs))
}

/// Runs one call; a call the model rejects or the device cannot hold is run in pieces.
fn run_call(
    session: &mut ModelSession,
    plan: &TensorPlan,
    input: &RecordBatch,
    call: Call,
) -> Result<Ran, ShardError> {
    let n = call.rows.len();
    let fits = session.row_limit.is_none_or(|limit| n <= limit);
    let whole = if fits {
        match session.run(&call.tensors, &plan.outputs, n, call.lengths.as_deref()) {
            Ok(outputs) => {
                return Ok(Ran {
                    kept: call.rows,
                    outputs,
                    rejected: Vec::new(),
                });
            }
            Err(e) => Some(e),
        }
    } else {
        None
    };
    // Run it in pieces: smaller calls where the device ran out of memory, and halves down to
    // single rows to find the rows the model rejects.
    let batch = take_rows(input, &call.rows)?;
    let mut calls = Calls {
        session,
        plan,
        batch: &batch,
        ok: Vec::new(),
        rejected: Vec::new(),
    };
    calls.run(0, n, whole)?;
    let Calls { ok, rejected, .. } = calls;
    if ok.is_empty() && n > 1 {
        // Every row fails alone too: the model or the device is broken, not the data.
        let reason = rejected.first().map(|(_, m)| m.clone()).unwrap_or_default();
        return Err(ShardError::Inference(reason));
    }
    let kept = ok
        .iter()
        .flat_map(|(from, to, _)| call.rows[*from..*to].iter().copied())
        .collect();
    let outputs = (0..plan.outputs.len())
        .map(|k| {
            let parts: Vec<&dyn arrow::array::Array> =
                ok.iter().map(|(_, _, out)| out[k].as_ref()).collect();
            if parts.is_empty() {
                Ok(empty_outputs(plan)[k].clone())
            } else {
                concat(&parts).map_err(|e| ShardError::Internal(e.to_string()))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rejected = rejected
        .into_iter()
        .map(|(i, message)| RowError {
            row: call.rows[i] as usize,
            class: "model",
            message,
        })
        .collect();
    Ok(Ran {
        kept,
        outputs,
        rejected,
    })
}

type Segment = (usize, usize, Vec<ArrayRef>);

/// Model calls over the rows of one batch, in order: the outputs of the ranges that ran and the
/// rows the model rejected.
struct Calls<'a> {
    session: &'a mut ModelSession,
    plan: &'a TensorPlan,
    batch: &'a RecordBatch,
    ok: Vec<Segment>,
    rejected: Vec<(usize, String)>,
}

impl Calls<'_> {
    /// Runs rows `[from, to)` in calls of at most the session's row limit. A call the device
    /// has no memory for halves the limit (for this and every later batch) and is run again in
    /// pieces; a call the model rejects is split in halves down to single rows. `failed` is a
    /// failure this range already had as one call. The calls of a range above the limit are
    /// made in a loop: the stack deepens only with each halving, never with the number of
    /// calls (a batch of 16,384 rows the device holds one row of would otherwise overflow it).
    fn run(&mut self, from: usize, to: usize, failed: Option<RunError>) -> Result<(), ShardError> {
        let rows = to - from;
        if self.session.row_limit.is_some_and(|l| rows > l) {
            let mut start = from;
            while let Some(limit) = self.session.row_limit.filter(|_| start < to) {
                let end = to.min(start + limit);
                self.run(start, end, None)?;
                start = end;
            }
            return Ok(());
        }
        let outcome = match failed {
            Some(e) => Err(e),
            None => {
                let slice = self.batch.slice(from, rows);
                let tensors = input_tensors(&slice, &self.plan.inputs)?;
                let lengths = self.plan.text.as_ref().map(|t| token_lengths(&slice, t));
                self.session
                    .run(&tensors, &self.plan.outputs, rows, lengths.as_deref())
            }
        };
        match outcome {
            Ok(out) => self.ok.push((from, to, out)),
            Err(RunError::OutOfMemory(e)) if rows == 1 => {
                return Err(ShardError::Inference(format!(
                    "out of device memory even for one row: {e}"
                )));
            }
            Err(RunError::OutOfMemory(e)) => {
                let limit = rows / 2;
                tracing::warn!(rows, limit, error = %e, "out of device memory; calls halved");
                self.session.row_limit = Some(limit);
                self.run(from, to, None)?;
            }
            Err(e @ (RunError::Failed(_) | RunError::Tensor(_))) if rows == 1 => {
                self.rejected.push((from, e.to_string()))
            }
            Err(RunError::Failed(_) | RunError::Tensor(_)) => {
                let mid = from + rows / 2;
                self.run(from, mid, None)?;
                self.run(mid, to, None)?;
            }
        }
        Ok(())
    }
}

fn empty_outputs(plan: &TensorPlan) -> Vec<ArrayRef> {
    let fields = plan.output_schema.fields();
    fields[fields.len() - plan.outputs.len()..]
        .iter()
        .map(|f| arrow::array::new_empty_array(f.data_type()))
        .collect()
}
