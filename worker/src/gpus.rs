//! The GPUs of this machine, found through the CUDA driver loaded at run time (`cudarc` with
//! dynamic loading): the same binary runs where no CUDA library exists, and then finds none.
//! `--gpus all|none|0,2` chooses which of them a worker uses; each slot's sessions run on one.

use std::fmt;
use std::str::FromStr;

use cudarc::driver::{result, sys};
use nightshift_proto::wire::GpuSample;

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuInfo {
    /// The CUDA device ordinal (`cuda:N`).
    pub index: u32,
    pub name: String,
    pub memory_bytes: u64,
    /// Compute capability, major and minor.
    pub compute_capability: (i32, i32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    #[error("--gpus `{0}`: give `all`, `none`, or device numbers such as `0,2`")]
    BadSelection(String),
    #[error("--gpus names GPU {index}, but this machine has {}", found_text(.found))]
    NotHere { index: u32, found: usize },
    #[error("the CUDA driver failed: {0}")]
    Driver(String),
}

fn found_text(found: &usize) -> String {
    match found {
        0 => "none (no CUDA driver or no device)".to_string(),
        n => format!("{n} (0 to {})", n - 1),
    }
}

/// Every GPU the CUDA driver sees; none when the driver library is not installed.
pub fn discover() -> Result<Vec<GpuInfo>, GpuError> {
    // SAFETY: only tries to open the library; nothing is called through it.
    if !unsafe { sys::is_culib_present() } {
        return Ok(Vec::new());
    }
    let driver = |e: cudarc::driver::DriverError| GpuError::Driver(e.to_string());
    result::init().map_err(driver)?;
    let count = result::device::get_count().map_err(driver)?;
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal).map_err(driver)?;
            let attribute = |a| {
                // SAFETY: `dev` is a device handle the driver just gave out.
                unsafe { result::device::get_attribute(dev, a) }.map_err(driver)
            };
            Ok(GpuInfo {
                index: ordinal as u32,
                name: result::device::get_name(dev).map_err(driver)?,
                // SAFETY: as above.
                memory_bytes: unsafe { result::device::total_mem(dev) }.map_err(driver)? as u64,
                compute_capability: (
                    attribute(
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                    )?,
                    attribute(
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                    )?,
                ),
            })
        })
        .collect()
}

/// Samples how busy GPUs are, through NVML loaded at run time; a machine without it has no
/// samples to give.
pub struct GpuMonitor {
    nvml: Option<nvml_wrapper::Nvml>,
}

impl GpuMonitor {
    pub fn new() -> Self {
        let nvml = nvml_wrapper::Nvml::init()
            .inspect_err(|e| tracing::debug!(error = %e, "no NVML: GPUs are not sampled"))
            .ok();
        Self { nvml }
    }

    /// Utilisation and memory of the GPUs `indices`; those NVML cannot read are left out.
    pub fn sample(&self, indices: &[u32]) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        indices
            .iter()
            .filter_map(|&index| {
                let device = nvml.device_by_index(index).ok()?;
                let busy = device.utilization_rates().ok()?;
                let memory = device.memory_info().ok()?;
                Some(GpuSample {
                    index,
                    utilization_percent: busy.gpu.min(100),
                    memory_used_bytes: memory.used,
                    memory_total_bytes: memory.total,
                })
            })
            .collect()
    }
}

impl Default for GpuMonitor {
    fn default() -> Self {
        Self::new()
    }
}

/// Which GPUs a worker uses: `--gpus all|none|0,2`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GpuSelection {
    /// Every GPU found (none where there is none).
    #[default]
    All,
    /// No GPU: models run on the CPU.
    None,
    /// These device numbers, each once, in this order.
    Only(Vec<u32>),
}

impl FromStr for GpuSelection {
    type Err = GpuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || GpuError::BadSelection(nightshift_proto::excerpt(s));
        match s.trim() {
            "all" => return Ok(GpuSelection::All),
            "none" => return Ok(GpuSelection::None),
            _ => {}
        }
        let mut picked: Vec<u32> = Vec::new();
        for part in s.split(',') {
            let n: u32 = part.trim().parse().map_err(|_| bad())?;
            if picked.contains(&n) {
                return Err(bad());
            }
            picked.push(n);
        }
        Ok(GpuSelection::Only(picked))
    }
}

impl fmt::Display for GpuSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuSelection::All => f.write_str("all"),
            GpuSelection::None => f.write_str("none"),
            GpuSelection::Only(list) => {
                let parts: Vec<String> = list.iter().map(u32::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

impl GpuSelection {
    /// The GPUs chosen among those `found`; a number that is not there is an error.
    pub fn resolve(&self, found: &[GpuInfo]) -> Result<Vec<GpuInfo>, GpuError> {
        match self {
            GpuSelection::All => Ok(found.to_vec()),
            GpuSelection::None => Ok(Vec::new()),
            GpuSelection::Only(list) => list
                .iter()
                .map(|&index| {
                    found
                        .iter()
                        .find(|g| g.index == index)
                        .cloned()
                        .ok_or(GpuError::NotHere {
                            index,
                            found: found.len(),
                        })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            name: format!("GPU {index}"),
            memory_bytes: 80 << 30,
            compute_capability: (9, 0),
        }
    }

    #[test]
    fn selections_parse_and_bad_ones_say_what_to_give() {
        assert_eq!("all".parse(), Ok(GpuSelection::All));
        assert_eq!(" none ".parse(), Ok(GpuSelection::None));
        assert_eq!("0,2".parse(), Ok(GpuSelection::Only(vec![0, 2])));
        assert_eq!("3".parse(), Ok(GpuSelection::Only(vec![3])));
        for bad in ["", "x", "0,,1", "-1", "1,1", "gpu0", "0;1"] {
            let e = bad.parse::<GpuSelection>().unwrap_err();
            assert!(e.to_string().contains("`all`, `none`"), "{bad:?}: {e}");
        }
        assert_eq!(GpuSelection::Only(vec![0, 2]).to_string(), "0,2");
    }

    #[test]
    fn selections_resolve_against_what_is_there() {
        let found = [gpu(0), gpu(1), gpu(2)];
        assert_eq!(GpuSelection::All.resolve(&found).unwrap().len(), 3);
        assert!(GpuSelection::None.resolve(&found).unwrap().is_empty());
        let two = GpuSelection::Only(vec![2, 0]).resolve(&found).unwrap();
        assert_eq!(two.iter().map(|g| g.index).collect::<Vec<_>>(), [2, 0]);
        let e = GpuSelection::Only(vec![5]).resolve(&found).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--gpus names GPU 5, but this machine has 3 (0 to 2)"
        );
        let e = GpuSelection::Only(vec![0]).resolve(&[]).unwrap_err();
        assert!(e.to_string().contains("none (no CUDA driver"), "{e}");
        assert!(GpuSelection::All.resolve(&[]).unwrap().is_empty());
    }

    #[test]
    fn without_nvml_there_is_nothing_to_sample() {
        let monitor = GpuMonitor::new();
        if monitor.nvml.is_none() {
            assert!(monitor.sample(&[0, 1]).is_empty());
        }
    }

    #[test]
    fn no_driver_library_means_no_gpu_not_a_crash() {
        // CI has no CUDA driver; a machine with one lists its devices. Either way, no panic.
        let found = discover().expect("discovery never fails for a missing driver");
        assert!(found.iter().all(|g| !g.name.is_empty()));
    }
}
