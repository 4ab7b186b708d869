//! Shared helpers of the optimizer's integration tests.

#![allow(dead_code)]

use candle_core::Device;

/// The device of `RANGER_TEST_DEVICE` (`cpu` when unset; `cuda[:N]` and `metal` need the
/// crate's feature of that name).
pub fn test_device() -> Device {
    match std::env::var("RANGER_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("metal") => Device::new_metal(0).expect("a Metal device"),
        Ok("cuda") => Device::new_cuda(0).expect("a CUDA device"),
        Ok(s) => Device::new_cuda(s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).expect("cpu|cuda[:N]|metal"))
            .expect("a CUDA device"),
    }
}
