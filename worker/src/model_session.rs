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
use crate::tensors::{self, TensorInput};

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

pub struct ModelSession {
    session: Session,
    pub device: ChosenDevice,
    /// Why `auto` chose what it chose.
    pub device_note: String,
}

impl ModelSession {
    /// Opens a session for the model file. `intra_threads` 0 lets ONNX Runtime decide.
    pub fn open(
        rt: &OnnxRuntime,
        uri: &str,
        path: &Path,
        device: Device,
        intra_threads: usize,
    ) -> Result<Self, ModelError> {
        let load_err = |e: ort::Error| ModelError::Load {
            uri: uri.to_string(),
            reason: format!("{e}"),
        };
        let cuda_ok = ep::CUDA::is_available().unwrap_or(false);
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
            Device::Auto if cuda_ok => (Some(0), "auto: CUDA provider present".to_string()),
            Device::Auto => (
                None,
                "auto: chose cpu, this ONNX Runtime has no CUDA execution provider".to_string(),
            ),
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
                    return Ok(Self {
                        session,
                        device: ChosenDevice::Cuda(n),
                        device_note: note,
                    });
                }
                Err(reason) if device != Device::Auto => {
                    return Err(ModelError::CudaUnavailable { device, reason });
                }
                Err(reason) => {
                    let note = format!("auto: chose cpu, CUDA failed: {reason}");
                    let session = builder()?.commit_from_file(path).map_err(load_err)?;
                    return Ok(Self {
                        session,
                        device: ChosenDevice::Cpu,
                        device_note: note,
                    });
                }
            }
        }
        let session = builder()?.commit_from_file(path).map_err(load_err)?;
        Ok(Self {
            session,
            device: ChosenDevice::Cpu,
            device_note: note,
        })
    }

    /// Runs one batch of `rows` rows and returns the mapped outputs as Arrow arrays.
    pub fn run(
        &mut self,
        inputs: &[TensorInput],
        outputs: &[OutputBinding],
        rows: usize,
    ) -> Result<Vec<ArrayRef>, String> {
        let views = inputs
            .iter()
            .map(|t| Ok((t.name.as_str(), t.view()?)))
            .collect::<Result<Vec<_>, String>>()?;
        let result = self.session.run(views).map_err(|e| e.to_string())?;
        outputs
            .iter()
            .map(|o| {
                let value = result
                    .get(o.onnx_name.as_str())
                    .ok_or_else(|| format!("the model returned no output `{}`", o.onnx_name))?;
                tensors::output_array(value, o, rows)
            })
            .collect()
    }
}
