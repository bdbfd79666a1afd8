//! One inference executor per worker slot (one GPU, or the CPU): a thread that owns the slot's
//! model sessions and runs the prepared batches of one shard at a time, in the order the shards
//! were handed to it. A shard's reading, decoding and tensor preparation run beside it, so the
//! next shard's first batches are ready when the current one's last batch is done; sessions stay
//! loaded across shards and jobs, the least recently used dropped first when the cache is full
//! or the GPU's memory runs short.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nightshift_proto::Device;
use nightshift_proto::wire::LoadedModel;
use nightshift_signature::TensorPlan;
use tokio::sync::{mpsc, oneshot};

use crate::gpus::GpuMonitor;
use crate::model_files::ModelFile;
use crate::model_session::{
    CallStats, ChosenDevice, ModelError, ModelSession, cuda_provider_available,
};
use crate::onnx_runtime::OnnxRuntime;
use crate::pipeline::infer::{Inferred, Prepared, infer_loop};
use crate::shard_error::ShardError;

/// Sessions a slot keeps loaded by default.
pub const DEFAULT_MODEL_CACHE: usize = 4;

/// A new session on a GPU is assumed to need this many times its model file's size in device
/// memory (weights plus workspace); less than that free evicts the least recently used session.
const SESSION_MEMORY_FACTOR: u64 = 4;

/// One shard's batches for the executor.
pub struct Stream {
    pub model: ModelFile,
    pub device: Device,
    pub plan: Arc<TensorPlan>,
    pub batches: mpsc::Receiver<Result<Prepared, ShardError>>,
    pub results: mpsc::Sender<Result<Inferred, ShardError>>,
    /// Sent when the executor is done with the stream.
    pub done: oneshot::Sender<StreamReport>,
}

/// What running one stream took.
#[derive(Debug, Default)]
pub struct StreamReport {
    pub calls: CallStats,
    /// The session was opened for it (not found loaded).
    pub opened: bool,
}

/// How the executor opens sessions.
#[derive(Clone, Copy)]
pub struct SessionOptions {
    pub runtime: &'static OnnxRuntime,
    /// ONNX Runtime intra-op threads per session (0: its default).
    pub intra_threads: usize,
    /// Sessions kept loaded.
    pub capacity: usize,
}

pub struct Executor {
    gpu: Option<u32>,
    streams: Mutex<Option<std_mpsc::Sender<Stream>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    loaded: Arc<Mutex<Vec<LoadedModel>>>,
}

impl Executor {
    /// Starts the executor thread of slot `index`, on `gpu` (`None`: no GPU, `auto` runs on the
    /// CPU).
    pub fn start(index: usize, gpu: Option<u32>, options: SessionOptions) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let cache = SessionCache {
            options,
            gpu,
            entries: Vec::new(),
            loaded: loaded.clone(),
            monitor: gpu.map(|_| GpuMonitor::new()),
        };
        let thread = std::thread::Builder::new()
            .name(format!("infer-{index}"))
            .spawn(move || executor_loop(cache, rx))?;
        Ok(Self {
            gpu,
            streams: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            loaded,
        })
    }

    /// Where a session for `device` will run on this slot: what decides the batch size before
    /// the session is open. (`auto` falls back to the CPU if opening on the GPU fails.)
    pub fn expected_device(&self, device: Device) -> ChosenDevice {
        match device {
            Device::Cpu => ChosenDevice::Cpu,
            Device::Cuda(n) => ChosenDevice::Cuda(n),
            Device::Auto => match self.gpu {
                Some(n) if cuda_provider_available() => ChosenDevice::Cuda(n),
                _ => ChosenDevice::Cpu,
            },
        }
    }

    /// Queues a shard's batches behind those already queued.
    pub fn submit(&self, stream: Stream) -> Result<(), ShardError> {
        let guard = lock(&self.streams);
        let sender = guard
            .as_ref()
            .ok_or_else(|| ShardError::Internal("the inference executor has stopped".into()))?;
        sender
            .send(stream)
            .map_err(|_| ShardError::Internal("the inference executor has stopped".into()))
    }

    /// The models this slot holds loaded, most recently used last.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        lock(&self.loaded).clone()
    }

    /// Lets the thread finish the streams queued and waits for it.
    pub fn stop(&self) {
        lock(&self.streams).take();
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            tracing::error!(gpu = ?self.gpu, "an inference executor panicked");
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn executor_loop(mut cache: SessionCache, streams: std_mpsc::Receiver<Stream>) {
    while let Ok(stream) = streams.recv() {
        if stream.results.is_closed() {
            continue; // the shard stopped before its turn
        }
        let Stream {
            model,
            device,
            plan,
            batches,
            results,
            done,
        } = stream;
        let (mut entry, opened) = match cache.checkout(&model, device) {
            Ok(found) => found,
            Err(e) => {
                let _ = results.blocking_send(Err(ShardError::Model(e)));
                continue;
            }
        };
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            infer_loop(&mut entry.session, &plan, batches, results)
        }));
        if ran.is_err() {
            tracing::error!(model = %model.uri, "inference panicked; the session is dropped");
            cache.publish(None);
            continue;
        }
        let _ = done.send(StreamReport {
            calls: std::mem::take(&mut entry.session.stats),
            opened,
        });
        cache.put_back(entry);
    }
}

struct Cached {
    key: String,
    device: Device,
    uri: String,
    session: ModelSession,
}

/// A slot's loaded sessions, least recently used first.
struct SessionCache {
    options: SessionOptions,
    gpu: Option<u32>,
    entries: Vec<Cached>,
    /// What `loaded()` shows: the cache plus the session in use.
    loaded: Arc<Mutex<Vec<LoadedModel>>>,
    monitor: Option<GpuMonitor>,
}

impl SessionCache {
    /// The session for `model` on `device`, and whether it had to be opened.
    fn checkout(
        &mut self,
        model: &ModelFile,
        device: Device,
    ) -> Result<(Cached, bool), ModelError> {
        if let Some(i) = self
            .entries
            .iter()
            .position(|c| c.key == model.key && c.device == device)
        {
            return Ok((self.entries.remove(i), false));
        }
        self.make_room(model);
        let o = self.options;
        let session = ModelSession::open(
            o.runtime,
            &model.uri,
            &model.path,
            device,
            self.gpu,
            o.intra_threads,
        )?;
        tracing::info!(model = %model.uri, device = %session.device, note = %session.device_note, "model session ready");
        let entry = Cached {
            key: model.key.clone(),
            device,
            uri: model.uri.clone(),
            session,
        };
        self.publish(Some(&entry));
        Ok((entry, true))
    }

    fn put_back(&mut self, entry: Cached) {
        self.entries.push(entry);
        while self.entries.len() > self.options.capacity.max(1) {
            let old = self.entries.remove(0);
            tracing::info!(model = %old.uri, "model session evicted (cache full)");
        }
        self.publish(None);
    }

    /// Drops least recently used sessions until a new one fits: fewer than the capacity, and
    /// on a GPU enough free memory for the model.
    fn make_room(&mut self, model: &ModelFile) {
        let need = std::fs::metadata(&model.path).map_or(0, |m| m.len()) * SESSION_MEMORY_FACTOR;
        while !self.entries.is_empty()
            && (self.entries.len() >= self.options.capacity.max(1) || self.gpu_short_of(need))
        {
            let old = self.entries.remove(0);
            tracing::info!(model = %old.uri, "model session evicted to make room");
        }
    }

    fn gpu_short_of(&self, bytes: u64) -> bool {
        let (Some(monitor), Some(gpu)) = (&self.monitor, self.gpu) else {
            return false;
        };
        monitor
            .sample(&[gpu])
            .first()
            .is_some_and(|s| s.memory_total_bytes.saturating_sub(s.memory_used_bytes) < bytes)
    }

    fn publish(&self, in_use: Option<&Cached>) {
        let view = |c: &Cached| LoadedModel {
            uri: c.uri.clone(),
            device: c.session.device.to_string(),
        };
        let mut all: Vec<LoadedModel> = self.entries.iter().map(view).collect();
        all.extend(in_use.map(view));
        *lock(&self.loaded) = all;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
