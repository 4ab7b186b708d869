//! A download's progress: a bar on a terminal (hidden otherwise), and the size the server
//! announced, which hf-hub itself never compares with what it wrote.

use hf_hub::api::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Follows one file's download.
pub(crate) struct Tracker {
    bar: ProgressBar,
    /// The size announced by the server (0 until the download starts).
    pub expected: u64,
}

impl Tracker {
    /// A tracker with a bar on stderr (drawn only on a terminal).
    pub fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ({eta})")
                .expect("template"),
        );
        Self { bar, expected: 0 }
    }
}

// A `&mut` so that the caller keeps the tracker (hf-hub takes the progress by value).
impl Progress for &mut Tracker {
    fn init(&mut self, size: usize, filename: &str) {
        self.expected = size as u64;
        self.bar.set_length(self.expected);
        // hf-hub calls `init` again on each retry, then `update` with the bytes already there.
        self.bar.set_position(0);
        self.bar.set_message(filename.to_string());
    }

    fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}
