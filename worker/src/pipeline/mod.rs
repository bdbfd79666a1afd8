//! One leased shard through the pipeline: read -> prepare -> infer -> write parts -> checkpoint.
//! Stages are joined by bounded channels, so memory stays flat whatever the input size, and the
//! model never waits on I/O while the channels hold work.

pub mod infer;
mod merge;
pub mod parts;
pub mod reader;

use std::sync::Arc;

use futures::StreamExt;
use nightshift_proto::layout::parts_dir;
use nightshift_proto::wire::ShardLease;
use nightshift_signature::plan_tensors;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::context::WorkerContext;
use crate::executor::{Executor, Stream};
use crate::model_session::ChosenDevice;
use crate::shard_error::ShardError;
use crate::text;
use infer::{TextCalls, prepare};
use parts::PartSink;
use reader::{ShardInput, read_batches};

/// Batches buffered between two stages.
const STAGE_DEPTH: usize = 2;

/// How a shard run is told to stop.
#[derive(Clone, Default)]
pub struct ShardSignals {
    /// Finish the batches in flight, checkpoint them, release the lease.
    pub drain: CancellationToken,
    /// Stop now and discard what is not committed (the lease is lost or the job cancelled).
    pub abort: CancellationToken,
}

#[derive(Debug)]
pub enum ShardOutcome {
    /// Every row committed and the shard completed. `rows` were computed by this run.
    Completed {
        rows: u64,
    },
    /// Drained: released with `committed` rows checkpointed.
    Released {
        committed: u64,
    },
    /// The lease was lost or the job stopped; nothing more was committed.
    Lost,
    Failed(ShardError),
}

/// Tells the worker's lease loop that a shard no longer feeds its slot's executor with new
/// input (its input is read, or it is merge work), so the slot can take the next shard, whose
/// reading then overlaps this one's last batches.
#[derive(Default)]
pub struct InputDone {
    done: std::sync::atomic::AtomicBool,
    wake: Arc<tokio::sync::Notify>,
}

impl InputDone {
    pub fn new(wake: Arc<tokio::sync::Notify>) -> Self {
        Self {
            done: Default::default(),
            wake,
        }
    }

    pub fn mark(&self) {
        if !self.done.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }
}

pub async fn run_shard(
    ctx: &WorkerContext,
    lease: &ShardLease,
    executor: &Executor,
    signals: &ShardSignals,
    input_done: &Arc<InputDone>,
) -> ShardOutcome {
    let outcome = run(ctx, lease, executor, signals, input_done).await;
    input_done.mark();
    match outcome {
        Ok(outcome) => outcome,
        Err(e) if e.is_lease_lost() => ShardOutcome::Lost,
        Err(e) => ShardOutcome::Failed(e),
    }
}

async fn run(
    ctx: &WorkerContext,
    lease: &ShardLease,
    executor: &Executor,
    signals: &ShardSignals,
    input_done: &Arc<InputDone>,
) -> Result<ShardOutcome, ShardError> {
    if let Some(sources) = &lease.merge {
        input_done.mark(); // merge work never uses the executor
        return merge::run_merge(ctx, lease, sources, signals).await;
    }
    let spec = &lease.spec;
    let lease_ref = lease.lease_ref();
    let total = lease.plan.rows;
    let skip = lease.checkpoint_rows;
    if skip >= total {
        ctx.client.complete(lease_ref).await?;
        return Ok(ShardOutcome::Completed { rows: 0 });
    }
    let model = ctx.models.get(&ctx.stores, &spec.model.uri).await?;
    let input = ShardInput::open(&ctx.stores, lease, ctx.read_counter.clone()).await?;
    let plan =
        plan_tensors(spec, &model.signature, input.schema(), &lease.file.uri).map_err(|e| {
            ShardError::Schema {
                uri: lease.file.uri.clone(),
                message: e.to_string(),
            }
        })?;
    let plan = Arc::new(plan);
    let prefix = ctx
        .stores
        .locate(&spec.output.uri)?
        .join(&parts_dir(&lease.job_uid));
    let mut sink = PartSink::new(
        prefix,
        lease,
        plan.clone(),
        spec.output.passthrough.clone(),
        spec.shards.checkpoint_rows,
    );

    let (read_tx, mut read_rx) = mpsc::channel(STAGE_DEPTH);
    let (prep_tx, prep_rx) = mpsc::channel(STAGE_DEPTH);
    let (inf_tx, mut inf_rx) = mpsc::channel(STAGE_DEPTH);
    let columns = spec.input_columns();
    let reader_lease = lease.clone();
    let drain = signals.drain.clone();
    let on_gpu = matches!(
        executor.expected_device(spec.model.device),
        ChosenDevice::Cuda(_)
    );
    let batch_size = spec.batch.size.start_rows(on_gpu) as usize;
    tracing::info!(shard = lease.shard_id, batch_rows = batch_size, size = %spec.batch.size, "batch size");
    let text = text_calls(ctx, spec, batch_size).await?;
    // A text job reads windows of several calls, whose rows it groups by length.
    let read_rows = batch_size
        * if text.is_some() {
            text::WINDOW_CALLS
        } else {
            1
        };
    let reader_done = input_done.clone();
    let reader = tokio::spawn(async move {
        let read = read_batches(
            input,
            &reader_lease,
            &columns,
            read_rows,
            skip,
            read_tx,
            drain,
        )
        .await;
        reader_done.mark();
        read
    });
    // Tensors are prepared on several blocking threads at once, handed on in input order.
    let prep_plan = plan.clone();
    let prepare_threads = ctx.prepare_threads.max(1);
    let preparer = tokio::spawn(async move {
        let mut prepared = futures::stream::poll_fn(move |cx| read_rx.poll_recv(cx))
            .map(|item| {
                let plan = prep_plan.clone();
                let text = text.clone();
                tokio::task::spawn_blocking(move || {
                    item.and_then(|b| prepare(b, &plan, text.as_ref()))
                })
            })
            .buffered(prepare_threads);
        while let Some(out) = prepared.next().await {
            let out = out.unwrap_or_else(|e| Err(ShardError::Internal(e.to_string())));
            if prep_tx.send(out).await.is_err() {
                break;
            }
        }
    });
    let (done_tx, done_rx) = oneshot::channel();
    executor.submit(Stream {
        model: model.clone(),
        device: spec.model.device,
        plan: plan.clone(),
        batches: prep_rx,
        results: inf_tx,
        done: done_tx,
    })?;

    let mut committed = skip;
    let mut computed = 0u64;
    let mut batch_rows = batch_size;
    let result: Result<bool, ShardError> = async {
        loop {
            let item = tokio::select! {
                biased;
                _ = signals.abort.cancelled() => return Ok(false),
                item = inf_rx.recv() => item,
            };
            let Some(item) = item else { break };
            let inf = item?;
            computed += inf.input.num_rows() as u64;
            ctx.metrics
                .record_batch(inf.input.num_rows(), inf.errors.len());
            tracing::debug!(
                shard = lease.shard_id,
                start = inf.start,
                rows = inf.input.num_rows(),
                "batch inferred"
            );
            batch_rows = inf.row_limit.map_or(batch_size, |l| l.min(batch_size));
            if let Some(part) = sink.write(inf).await? {
                let next = part.row_start + part.rows;
                ctx.client
                    .checkpoint(lease_ref, part, Some(batch_rows as u64))
                    .await?;
                committed = next;
            }
        }
        if let Some(part) = sink.finish().await? {
            let next = part.row_start + part.rows;
            ctx.client
                .checkpoint(lease_ref, part, Some(batch_rows as u64))
                .await?;
            committed = next;
        }
        Ok(true)
    }
    .await;
    if !matches!(result, Ok(true)) {
        sink.abort().await;
    }
    drop(inf_rx);
    let _ = reader.await;
    let _ = preparer.await;
    if let Ok(report) = done_rx.await {
        ctx.metrics.record_stream(report);
    }
    match result {
        Ok(false) => return Ok(ShardOutcome::Lost),
        Err(e) => return Err(e),
        Ok(true) => {}
    }
    if committed == total {
        ctx.client.complete(lease_ref).await?;
        return Ok(ShardOutcome::Completed { rows: computed });
    }
    if signals.drain.is_cancelled() {
        ctx.client.release(lease_ref).await?;
        return Ok(ShardOutcome::Released { committed });
    }
    Err(ShardError::Internal(format!(
        "input ended at row {committed} of {total}"
    )))
}

/// A text job's tokenizer (truncating at `max_length`) and how it cuts model calls.
async fn text_calls(
    ctx: &WorkerContext,
    spec: &nightshift_proto::JobSpec,
    batch_size: usize,
) -> Result<Option<TextCalls>, ShardError> {
    let Some(t) = &spec.text else {
        return Ok(None);
    };
    let tokenizer = ctx.models.tokenizer(&ctx.stores, &t.tokenizer).await?;
    let tokenizer = text::truncating(&tokenizer, t.max_length).map_err(|reason| {
        ShardError::Model(crate::model_session::ModelError::Load {
            uri: t.tokenizer.clone(),
            reason,
        })
    })?;
    Ok(Some(TextCalls {
        tokenizer: Arc::new(tokenizer),
        max_rows: batch_size,
        max_tokens: spec.batch.max_tokens.unwrap_or(text::DEFAULT_MAX_TOKENS),
    }))
}
