//! One ONNX Runtime session on the chosen device. `device = "cuda"` on a machine without a
//! usable CUDA provider is refused with the reason, never silently run on CPU; `auto` says which
//! it chose.

use std::fmt;
use std::path::Path;

use arrow_array::ArrayRef;
use nightshift_proto::Device;
use nightshift_signature::OutputBinding;
use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::onnx_runtime::OnnxRuntime;
use crate::tensors::{self, TensorError, TensorInput};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("cannot load model `{uri}`: {reason}")]
    Load { uri: String, reason: String },
    #[error("device = \"{device}\" but CUDA is not usable here: {reason}")]
    CudaUnavailable { device: Device, reason: String },
}

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenDevice {
    Cpu,
    Cuda(u32),
}

impl fmt::Display for ChosenDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChosenDevice::Cpu => f.write_str("cpu"),
            ChosenDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a model call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    /// The device had no memory for a call this large: a smaller one may fit.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// The model refused the input (or failed on it).
    #[error("{0}")]
    Failed(String),
    /// The batch could not become tensors, or the outputs Arrow arrays.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

/// ONNX Runtime reports an allocation failure with the generic RUNTIME_EXCEPTION code and no
/// code of its own; its messages for it (the BFC arena's "Failed to allocate memory", CUDA's
/// "out of memory") are the only sign, so this is the one place that reads them.
fn classify(e: ort::Error) -> RunError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("out of memory") || lower.contains("failed to allocate memory") {
        RunError::OutOfMemory(text)
    } else {
        RunError::Failed(text)
    }
}

/// An out-of-memory error on calls above `limit` rows, when the `model-run-oom` failpoint is
/// set (`return(LIMIT)`); nothing otherwise. Only builds with the `failpoints` feature have it.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn injected_oom(rows: usize) -> Option<RunError> {
    fail::fail_point!("model-run-oom", |limit: Option<String>| {
        let limit = limit.and_then(|l| l.parse::<usize>().ok()).unwrap_or(0);
        (rows > limit).then(|| RunError::OutOfMemory(format!("injected above {limit} rows")))
    });
    None
}

/// Whether the loaded ONNX Runtime has the CUDA execution provider.
pub fn cuda_provider_available() -> bool {
    ep::CUDA::is_available().unwrap_or(false)
}

/// Model calls a session has made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallStats {
    pub calls: u64,
    /// The most rows one call carried.
    pub largest: usize,
}

pub struct ModelSession {
    session: Session,
    pub device: ChosenDevice,
    /// Why `auto` chose what it chose.
    pub device_note: String,
    /// The most rows per call since the device ran out of memory on a larger one (`None`:
    /// no limit met yet). It stays with the session, across shards.
    pub row_limit: Option<usize>,
    pub stats: CallStats,
}

impl ModelSession {
    /// Opens a session for the model file. `gpu` is the GPU of the worker slot that opens it
    /// (`auto` uses it when ONNX Runtime can; `None`: the slot has none, and `auto` is the
    /// CPU); `cuda:N` names its device itself. `intra_threads` 0 lets ONNX Runtime decide.
    pub fn open(
        rt: &OnnxRuntime,
        uri: &str,
        path: &Path,
        device: Device,
        gpu: Option<u32>,
        intra_threads: usize,
    ) -> Result<Self, ModelError> {
        let load_err = |e: ort::Error| ModelError::Load {
            uri: uri.to_string(),
            reason: format!("{e}"),
        };
        let cuda_ok = cuda_provider_available();
        let (want_cuda, note) = match device {
            Device::Cpu => (None, "device = \"cpu\"".to_string()),
            Device::Cuda(n) => {
                if !cuda_ok {
                    return Err(ModelError::CudaUnavailable {
                        device,
                        reason: format!(
                            "the ONNX Runtime at `{}` was built without the CUDA execution provider \
                             (install onnxruntime-gpu and point --ort-lib at its libonnxruntime.so)",
                            rt.library.display()
                        ),
                    });
                }
                (Some(n), format!("device = \"{device}\""))
            }
            Device::Auto => match gpu {
                None => (None, "auto: chose cpu, this worker uses no GPU".to_string()),
                Some(n) if cuda_ok => (Some(n), format!("auto: the slot's GPU {n}")),
                Some(_) => (
                    None,
                    "auto: chose cpu, this ONNX Runtime has no CUDA execution provider".to_string(),
                ),
            },
        };
        let builder = || -> Result<_, ModelError> {
            let mut b = Session::builder(&rt.env)
                .map_err(load_err)?
                .with_optimization_level(GraphOptimizationLevel::All)
                .map_err(|e| load_err(e.into()))?;
            if intra_threads > 0 {
                b = b
                    .with_intra_threads(intra_threads)
                    .map_err(|e| load_err(e.into()))?;
            }
            // Idle intra-op threads block instead of spinning: spinning takes the cores the
            // pipeline's other stages (decode, encode) need between two model calls.
            b = b
                .with_intra_op_spinning(false)
                .map_err(|e| load_err(e.into()))?;
            Ok(b)
        };
        if let Some(n) = want_cuda {
            let attempt = builder()?
                .with_execution_providers([ep::CUDA::default()
                    .with_device_id(n as i32)
                    .build()
                    .error_on_failure()])
                .map_err(|e| e.to_string())
                .and_then(|mut b| b.commit_from_file(path).map_err(|e| e.to_string()));
            match attempt {
                Ok(session) => {
                    return Ok(Self::new(session, ChosenDevice::Cuda(n), note));
                }
                Err(reason) if device != Device::Auto => {
                    return Err(ModelError::CudaUnavailable { device, reason });
                }
                Err(reason) => {
                    let note = format!("auto: chose cpu, CUDA failed: {reason}");
                    let session = builder()?.commit_from_file(path).map_err(load_err)?;
                    return Ok(Self::new(session, ChosenDevice::Cpu, note));
                }
            }
        }
        let session = builder()?.commit_from_file(path).map_err(load_err)?;
        Ok(Self::new(session, ChosenDevice::Cpu, note))
    }

    fn new(session: Session, device: ChosenDevice, device_note: String) -> Self {
        Self {
            session,
            device,
            device_note,
            row_limit: None,
            stats: CallStats::default(),
        }
    }

    /// Runs one batch of `rows` rows and returns the mapped outputs as Arrow arrays.
    pub fn run(
        &mut self,
        inputs: &[TensorInput],
        outputs: &[OutputBinding],
        rows: usize,
        lengths: Option<&[usize]>,
    ) -> Result<Vec<ArrayRef>, RunError> {
        if let Some(e) = injected_oom(rows) {
            return Err(e);
        }
        // A slow device, when the `model-run-delay` failpoint is set (`sleep(MS)`): tests of
        // stragglers and of the fleet give workers a known speed. Only `failpoints` builds.
        fail::fail_point!("model-run-delay");
        let views = inputs
            .iter()
            .map(|t| Ok((t.name.as_str(), t.view()?)))
            .collect::<Result<Vec<_>, TensorError>>()?;
        let result = self.session.run(views).map_err(classify)?;
        self.stats.calls += 1;
        self.stats.largest = self.stats.largest.max(rows);
        outputs
            .iter()
            .map(|o| {
                let value = result.get(o.onnx_name.as_str()).ok_or_else(|| {
                    RunError::Failed(format!("the model returned no output `{}`", o.onnx_name))
                })?;
                Ok(tensors::output_array(value, o, rows, lengths)?)
            })
            .collect()
    }
}
