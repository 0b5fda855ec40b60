//! The `[device]` config, turning its request into a Candle device, and CPU threads.

use candle_core::Device;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::util::invalid::InvalidField;

/// `[device]`: where the tensors live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `auto` (CUDA when built with it and a GPU is present, else CPU), `cpu`, `cuda`, `cuda:N`.
    pub kind: DeviceSpec,
    /// CPU threads (0 = one per core).
    pub threads: usize,
}

impl DeviceConfig {
    /// Range checks of the `[device]` fields.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_threads(self.threads).map_err(|message| InvalidField {
            key: "device.threads".into(),
            message,
        })
    }
}

/// More threads than this per core only slows training down (and thousands
/// take minutes to create).
const MAX_THREADS_PER_CORE: usize = 4;

/// A thread count is 0 (one per core) or at most four per core.
pub fn check_threads(threads: usize) -> Result<(), String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = MAX_THREADS_PER_CORE * cores;
    if threads > most {
        return Err(format!(
            "{threads} threads on {cores} cores: expected 0 (one per core) up to {most}"
        ));
    }
    Ok(())
}

/// `--threads N` on the command line: checked as `device.threads` is.
pub fn parse_threads(text: &str) -> Result<usize, String> {
    let threads: usize = text
        .parse()
        .map_err(|_| format!("expected a whole number, got {text:?}"))?;
    check_threads(threads)?;
    Ok(threads)
}

/// A device request as written in a config: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected =
            || format!("expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {text:?}");
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let ordinal = text.strip_prefix("cuda:").ok_or_else(expected)?;
                ordinal
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| expected())
            }
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device.kind = \"{0}\" asks for CUDA, but this mnist-lab was built without it. \
         Rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit and nvcc), \
         or set device.kind = \"cpu\" (e.g. --set device.kind=cpu)"
    )]
    NoCudaSupport(DeviceSpec),
    #[error("cannot open CUDA device {ordinal}: {reason}")]
    Cuda { ordinal: usize, reason: String },
}

/// Opens the requested device. `auto` picks CUDA device 0 when this build has CUDA
/// and a GPU is visible (`CUDA_VISIBLE_DEVICES` applies), else the CPU.
pub fn select(spec: DeviceSpec) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal).map_err(|reason| match reason {
            None => DeviceError::NoCudaSupport(spec),
            Some(reason) => DeviceError::Cuda { ordinal, reason },
        }),
        DeviceSpec::Auto => {
            let device = match open_cuda(0) {
                Ok(device) => device,
                Err(_) => Device::Cpu,
            };
            tracing::info!(device = %describe(&device), "device auto-selected");
            Ok(device)
        }
    }
}

/// `Err(None)`: this build has no CUDA; `Err(Some(reason))`: it has, but opening failed.
fn open_cuda(ordinal: usize) -> Result<Device, Option<String>> {
    if !cfg!(feature = "cuda") {
        return Err(None);
    }
    Device::new_cuda(ordinal).map_err(|e| Some(e.to_string()))
}

/// `cpu` or `cuda:N`, as summaries and logs print it.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Sets the number of CPU threads Candle uses (0 keeps its default: one per core).
/// Takes effect only before the first tensor operation, so call it at start-up.
pub fn set_cpu_threads(threads: usize) {
    if threads > 0 {
        // SAFETY: called at start-up, before any thread that reads the environment exists.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        }
    }
}

/// The number of CPU threads Candle will use.
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        assert!(matches!(select(DeviceSpec::Cpu), Ok(Device::Cpu)));
        assert_eq!(describe(&Device::Cpu), "cpu");
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn cuda_without_the_feature_names_the_fix() {
        let err = select(DeviceSpec::Cuda(1)).unwrap_err().to_string();
        assert!(
            err.contains("cuda:1") && err.contains("--features cuda"),
            "{err}"
        );
        assert!(matches!(select(DeviceSpec::Auto), Ok(Device::Cpu)));
    }
}
