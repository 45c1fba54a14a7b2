//! `--device auto|cpu|cuda[:N]`. CUDA comes through cudarc with dynamic
//! loading, so ftk builds and runs without a CUDA toolkit; every cudarc call
//! except `is_culib_present` panics when the driver library is missing, so
//! nothing touches the driver until that check has passed.

use crate::error::{Error, Result};
use std::fmt;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when a driver and a device exist, else CPU, silently.
    Auto,
    Cpu,
    Cuda(usize),
}

/// A bad spelling is a usage error (exit 2).
impl std::str::FromStr for DeviceArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceArg> {
        match s {
            "auto" => Ok(DeviceArg::Auto),
            "cpu" => Ok(DeviceArg::Cpu),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| Error::input(format!("'{s}': use auto, cpu, cuda or cuda:N"))),
        }
    }
}

/// Where the work runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why no CUDA device can be used.
#[derive(Debug, thiserror::Error)]
pub enum NoCuda {
    #[error("the CUDA driver library (libcuda.so) is not installed")]
    NoDriver,
    #[error("the CUDA driver failed to initialise: {0}")]
    Init(cudarc::driver::DriverError),
    #[error("the CUDA driver reports no devices")]
    NoDevices,
    #[error("cannot count CUDA devices: {0}")]
    Count(cudarc::driver::DriverError),
}

/// Number of CUDA devices, or why there are none.
pub fn cuda_devices() -> std::result::Result<usize, NoCuda> {
    // SAFETY: is_culib_present only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(NoCuda::NoDriver);
    }
    cudarc::driver::result::init().map_err(NoCuda::Init)?;
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(NoCuda::NoDevices),
        Err(e) => Err(NoCuda::Count(e)),
    }
}

impl DeviceArg {
    /// Resolve to a device: `auto` falls back to CPU silently; `cuda[:N]`
    /// without that device is a usage error (exit 2).
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Auto => Ok(match cuda_devices() {
                Ok(_) => Device::Cuda(0),
                Err(_) => Device::Cpu,
            }),
            DeviceArg::Cuda(n) => match cuda_devices() {
                Ok(count) if n < count => Ok(Device::Cuda(n)),
                Ok(count) => Err(Error::input(format!(
                    "--device cuda:{n}: only {count} CUDA device(s) present (cuda:0..cuda:{})",
                    count - 1
                ))),
                Err(why) => Err(Error::input(format!(
                    "--device cuda:{n}: {why}; use --device cpu or auto"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!("auto".parse::<DeviceArg>().unwrap(), DeviceArg::Auto);
        assert_eq!("cuda".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(3));
        assert!("gpu".parse::<DeviceArg>().is_err());
        assert!("cuda:x".parse::<DeviceArg>().is_err());
    }

    #[test]
    fn cpu_always_resolves_and_auto_never_fails() {
        assert_eq!(DeviceArg::Cpu.resolve().unwrap(), Device::Cpu);
        assert!(DeviceArg::Auto.resolve().is_ok());
        // Without a GPU, asking for one is a clear usage error, not a panic.
        if cuda_devices().is_err() {
            let e = DeviceArg::Cuda(0).resolve().unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("--device cpu"), "{e}");
        }
    }
}
