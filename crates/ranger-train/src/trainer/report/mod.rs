//! The built-in observers: the progress bar and console lines, `metrics.jsonl` and the loss
//! curve.

mod console;
mod loss_curve;
mod metrics_file;

pub use console::{describe, Console};
pub use loss_curve::{write_loss_svg, LossCurve};
pub use metrics_file::MetricsFile;
