//! The `device` option: which Candle device a run uses.

/// Parses `auto|cpu|cuda[:N]|metal`.
pub fn parse_device(spec: &str) -> candle_core::Result<candle_core::Device> {
    use candle_core::Device;
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => Device::new_metal(0),
        "cuda" => Device::new_cuda(0),
        s if s.starts_with("cuda:") => {
            let n = s[5..].parse::<usize>().map_err(|_| candle_core::Error::msg(format!("bad device {s:?}")))?;
            Device::new_cuda(n)
        }
        s => Err(candle_core::Error::msg(format!("unknown device {s:?} (auto, cpu, cuda, cuda:N, metal)"))),
    }
}
