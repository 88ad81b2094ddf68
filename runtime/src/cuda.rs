//! CUDA probe: is there a driver and a device, and what is it? cudarc loads `libcuda.so` lazily (dynamic loading),
//! and panics on first use when the library is missing, so we look for the library before touching the driver.

use cudarc::driver::{sys, CudaContext, DriverError};

/// What [`cuda_available`] found: the device `--backend cuda` would run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal (0 for the first GPU).
    pub ordinal: usize,
    /// Number of CUDA devices the driver sees.
    pub device_count: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// Global memory, in bytes.
    pub total_memory_bytes: u64,
}

impl DeviceInfo {
    /// The SM number codegen targets for this device: 10·major + minor (e.g. 90 for sm_90).
    pub fn sm(&self) -> u32 {
        self.compute_capability.0 * 10 + self.compute_capability.1
    }
}

/// Why the `cuda` backend cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum CudaUnavailable {
    /// `libcuda.so` could not be loaded.
    #[error("no CUDA driver (libcuda.so) found: --backend cuda needs an NVIDIA GPU and driver; use --backend cpu")]
    NoDriver,
    /// The driver loaded but reports no device (or not the one asked for).
    #[error("the CUDA driver sees {device_count} device(s), so device {ordinal} is not available; use --backend cpu")]
    NoDevice {
        /// The device asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        device_count: usize,
    },
    /// A driver call failed.
    #[error("CUDA driver error while {doing}: {source}")]
    Driver {
        /// What we were doing ("initializing the driver", "creating a context on device 0", ...).
        doing: String,
        /// The driver's error code.
        #[source]
        source: DriverError,
    },
}

/// Probes device 0. See [`cuda_device`].
pub fn cuda_available() -> Result<DeviceInfo, CudaUnavailable> {
    cuda_device(0)
}

/// Checks that the CUDA driver library loads, that device `ordinal` exists, creates (retains) its primary context,
/// and reports its name, compute capability and memory. Never panics for lack of a driver or device.
pub fn cuda_device(ordinal: usize) -> Result<DeviceInfo, CudaUnavailable> {
    // SAFETY: only tries to dlopen the driver library under its usual names; no driver call is made.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaUnavailable::NoDriver);
    }
    let driver = |doing: String| move |source: DriverError| CudaUnavailable::Driver { doing, source };
    let count = CudaContext::device_count().map_err(driver("initializing the driver".into()))?;
    let device_count = usize::try_from(count).unwrap_or(0);
    if ordinal >= device_count {
        return Err(CudaUnavailable::NoDevice { ordinal, device_count });
    }
    let context = CudaContext::new(ordinal).map_err(driver(format!("creating a context on device {ordinal}")))?;
    let name = context.name().map_err(driver(format!("reading the name of device {ordinal}")))?;
    let (major, minor) =
        context.compute_capability().map_err(driver(format!("reading the compute capability of device {ordinal}")))?;
    let total_memory = context.total_mem().map_err(driver(format!("reading the memory size of device {ordinal}")))?;
    Ok(DeviceInfo {
        ordinal,
        device_count,
        name,
        compute_capability: (major.max(0) as u32, minor.max(0) as u32),
        total_memory_bytes: total_memory as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without a driver the probe must return the clean error, not panic; with one it must either
    /// describe a real device or say cleanly why not. `TUNEC_EXPECT_CUDA=1` (set on GPU hosts) demands a device.
    #[test]
    fn probe_never_panics_and_explains_itself() {
        let expect_device = std::env::var("TUNEC_EXPECT_CUDA").as_deref() == Ok("1");
        // SAFETY: dlopen probe only.
        let driver_present = unsafe { sys::is_culib_present() };
        match cuda_available() {
            Ok(info) => {
                assert!(driver_present);
                eprintln!("CUDA device: {info:?} (sm_{})", info.sm());
                assert!(!info.name.is_empty(), "{info:?}");
                assert!(info.sm() >= 50, "{info:?}");
                assert!(info.device_count >= 1 && info.total_memory_bytes > 0, "{info:?}");
            }
            Err(err) => {
                assert!(!expect_device, "TUNEC_EXPECT_CUDA=1 but: {err}");
                let message = err.to_string();
                assert!(
                    message.contains("--backend cpu") || matches!(err, CudaUnavailable::Driver { .. }),
                    "{message}"
                );
                if !driver_present {
                    assert!(matches!(err, CudaUnavailable::NoDriver), "{err:?}");
                    assert_eq!(
                        message,
                        "no CUDA driver (libcuda.so) found: --backend cuda needs an NVIDIA GPU and driver; use --backend cpu"
                    );
                }
            }
        }
    }

    #[test]
    fn sm_number_from_compute_capability() {
        let info = DeviceInfo {
            ordinal: 0,
            device_count: 1,
            name: "test".into(),
            compute_capability: (9, 0),
            total_memory_bytes: 1,
        };
        assert_eq!(info.sm(), 90);
        assert_eq!(DeviceInfo { compute_capability: (8, 6), ..info }.sm(), 86);
    }
}
