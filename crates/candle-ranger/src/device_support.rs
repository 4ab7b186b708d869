//! What a device can compute in. Metal has no f64 at all (no cast, arithmetic, reduction or
//! matmul in Candle 0.11), so an f64 variable there would fail in every op of a step; it is
//! refused when the optimizer is built instead.

use candle_core::{DType, DeviceLocation};

use crate::error::{Error, Result};

/// Refuses variable `name` when its device cannot compute in its dtype.
pub(crate) fn check_var_device(name: &str, dtype: DType, location: DeviceLocation) -> Result<()> {
    if dtype == DType::F64 && matches!(location, DeviceLocation::Metal { .. }) {
        return Err(Error::UnsupportedDtype { name: name.to_string(), dtype, device: "Metal".to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_is_refused_on_metal_only() {
        let err = check_var_device("w", DType::F64, DeviceLocation::Metal { gpu_id: 0 }).unwrap_err();
        assert_eq!(err.to_string(), "variable `w` is f64 on Metal, which has no f64 operations: use f32, bf16 or f16");
        for dt in [DType::F32, DType::BF16, DType::F16] {
            assert!(check_var_device("w", dt, DeviceLocation::Metal { gpu_id: 0 }).is_ok());
        }
        assert!(check_var_device("w", DType::F64, DeviceLocation::Cpu).is_ok());
        assert!(check_var_device("w", DType::F64, DeviceLocation::Cuda { gpu_id: 0 }).is_ok());
    }
}
