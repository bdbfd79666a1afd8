//! Stages 2 and 3: prepare tensors (find rows that cannot feed the model, stack the rest) on
//! blocking threads, and run the model on the slot's executor thread, which owns the session. A batch the
//! model rejects is split in halves until the rows it rejects are found; those become poison
//! rows and the rest goes on.

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::{concat, take_record_batch};
use arrow_array::RecordBatch;
use nightshift_signature::TensorPlan;
use tokio::sync::mpsc;

use crate::model_session::{ModelSession, RunError};
use crate::pipeline::reader::InputBatch;
use crate::shard_error::ShardError;
use crate::tensors::{TensorInput, input_tensors, row_problems};

/// Why a row went to `_errors/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// Row index within its batch.
    pub row: usize,
    /// `data` (cannot become a tensor) or `model` (the model rejects it).
    pub class: &'static str,
    pub message: String,
}

/// A batch ready for the model.
pub struct Prepared {
    pub start: u64,
    pub input: RecordBatch,
    /// Rows that can feed the model (None: all of them).
    pub good: Option<Vec<u32>>,
    pub tensors: Vec<TensorInput>,
    pub errors: Vec<RowError>,
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
}

/// Finds rows that cannot become tensors and builds the tensors from the rest.
pub fn prepare(b: InputBatch, plan: &TensorPlan) -> Result<Prepared, ShardError> {
    let problems = row_problems(&b.batch, &plan.inputs);
    if problems.is_empty() {
        let tensors = input_tensors(&b.batch, &plan.inputs)?;
        return Ok(Prepared {
            start: b.start,
            input: b.batch,
            good: None,
            tensors,
            errors: Vec::new(),
        });
    }
    let mut bad = problems.iter().map(|p| p.row).peekable();
    let good: Vec<u32> = (0..b.batch.num_rows())
        .filter(|r| {
            if bad.peek() == Some(r) {
                bad.next();
                false
            } else {
                true
            }
        })
        .map(|r| r as u32)
        .collect();
    let good_batch = take_rows(&b.batch, &good)?;
    let tensors = if good.is_empty() {
        Vec::new()
    } else {
        input_tensors(&good_batch, &plan.inputs)?
    };
    Ok(Prepared {
        start: b.start,
        input: b.batch,
        good: Some(good),
        tensors,
        errors: problems
            .into_iter()
            .map(|p| RowError {
                row: p.row,
                class: "data",
                message: p.message,
            })
            .collect(),
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

fn infer(
    session: &mut ModelSession,
    plan: &TensorPlan,
    p: Prepared,
) -> Result<Inferred, ShardError> {
    let good_rows: Vec<u32> = match &p.good {
        Some(g) => g.clone(),
        None => (0..p.input.num_rows() as u32).collect(),
    };
    if good_rows.is_empty() {
        return Ok(Inferred {
            start: p.start,
            input: p.input,
            kept: Some(Vec::new()),
            outputs: empty_outputs(plan),
            errors: p.errors,
            row_limit: session.row_limit,
        });
    }
    let fits = session
        .row_limit
        .is_none_or(|limit| good_rows.len() <= limit);
    let whole = if fits {
        match session.run(&p.tensors, &plan.outputs, good_rows.len()) {
            Ok(outputs) => {
                return Ok(Inferred {
                    start: p.start,
                    input: p.input,
                    kept: p.good,
                    outputs,
                    errors: p.errors,
                    row_limit: session.row_limit,
                });
            }
            Err(e) => Some(e),
        }
    } else {
        None
    };
    // Run it in pieces: smaller calls where the device ran out of memory, and halves down to
    // single rows to find the rows the model rejects.
    let good_batch = take_rows(&p.input, &good_rows)?;
    let mut calls = Calls {
        session,
        plan,
        batch: &good_batch,
        ok: Vec::new(),
        rejected: Vec::new(),
    };
    calls.run(0, good_rows.len(), whole)?;
    let Calls {
        ok,
        rejected,
        session,
        ..
    } = calls;
    if ok.is_empty() && good_rows.len() > 1 {
        // Every row fails alone too: the model or the device is broken, not the data.
        let reason = rejected.first().map(|(_, m)| m.clone()).unwrap_or_default();
        return Err(ShardError::Inference(reason));
    }
    let mut errors = p.errors;
    errors.extend(rejected.into_iter().map(|(i, message)| RowError {
        row: good_rows[i] as usize,
        class: "model",
        message,
    }));
    errors.sort_by_key(|e| e.row);
    let kept: Vec<u32> = ok
        .iter()
        .flat_map(|(from, to, _)| good_rows[*from..*to].iter().copied())
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
    Ok(Inferred {
        start: p.start,
        input: p.input,
        kept: Some(kept),
        outputs,
        errors,
        row_limit: session.row_limit,
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
    /// failure this range already had as one call.
    fn run(&mut self, from: usize, to: usize, failed: Option<RunError>) -> Result<(), ShardError> {
        let rows = to - from;
        if let Some(limit) = self.session.row_limit.filter(|&l| rows > l) {
            self.run(from, from + limit, None)?;
            return self.run(from + limit, to, None);
        }
        let outcome = match failed {
            Some(e) => Err(e),
            None => {
                let slice = self.batch.slice(from, rows);
                let tensors = input_tensors(&slice, &self.plan.inputs)?;
                self.session.run(&tensors, &self.plan.outputs, rows)
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
