//! The loss curve: an SVG (any browser or image viewer shows it) of the training loss per step
//! and the evaluation loss where measured, written as `loss_curve.svg` when the loop ends.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::trainer::observer::TrainObserver;
use crate::trainer::records::{LoopEnd, StepRecord};

/// Draws the loss curve into a file when the training loop ends (not when it stops on an error).
pub struct LossCurve {
    path: PathBuf,
}

impl LossCurve {
    /// Draws into `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

impl TrainObserver for LossCurve {
    fn on_loop_end(&mut self, end: &LoopEnd<'_>) -> Result<()> {
        match end.outcome {
            Ok(_) => write_loss_svg(&self.path, end.history),
            Err(_) => Ok(()),
        }
    }
}

/// Draws `records` (the metrics.jsonl records) into an SVG file, atomically.
pub fn write_loss_svg(path: &Path, records: &[StepRecord]) -> Result<()> {
    // JSON has no NaN: only finite figures were ever drawn.
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.step as f64, r.train.as_ref()?.loss)))
        .filter(|p| p.1.is_finite())
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.step as f64, r.eval.as_ref()?.eval_loss)))
        .filter(|p| p.1.is_finite())
        .collect();
    let (w, h, m) = (720.0, 420.0, 56.0);
    let all = train.iter().chain(&eval);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - m, w - m, h - m);
    let _ = writeln!(s, r#"<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#, h - m);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="4" y="{:.1}">{y:.3}</text>"#, py(y) + 4.0);
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}">{x:.0}</text>"#, px(x) - 8.0, h - m + 18.0);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">step</text><text x="{m}" y="20">loss (blue: training, red: evaluation)</text>"#,
        w / 2.0,
        h - 12.0
    );
    let points = |pts: &[(f64, f64)]| {
        pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect::<Vec<_>>().join(" ")
    };
    let _ = writeln!(s, r#"<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{}"/>"#, points(&train));
    if !eval.is_empty() {
        let _ = writeln!(s, r#"<polyline fill="none" stroke="crimson" stroke-width="2" points="{}"/>"#, points(&eval));
        for &(x, y) in &eval {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="crimson"/>"#, px(x), py(y));
        }
    }
    s.push_str("</svg>\n");
    crate::weights::write_atomic(path, s.as_bytes())
}
