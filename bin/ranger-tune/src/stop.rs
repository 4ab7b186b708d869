//! Stopping a run from outside. SIGINT (Ctrl-C), SIGTERM (what Slurm, Kubernetes, systemd and
//! spot or preemptible machines send before they kill a job) and SIGHUP (a closed terminal) all
//! ask the trainer to finish its optimizer step, write a checkpoint and the metrics, and stop; the
//! run then exits with [`EXIT_STOPPED`]. A second signal exits at once with [`EXIT_ABORTED`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// Exit status of a run stopped by a signal once its checkpoint is written: 75, `EX_TEMPFAIL`
/// of sysexits.h ("temporary failure; the user is invited to retry"). It is neither success (the
/// model is not written) nor an error (1; 2 for bad flags), and unlike 128 + the signal's number
/// it cannot be mistaken for a process the signal killed before it could save: a job script can
/// requeue on 75 with the printed `--resume` command.
pub const EXIT_STOPPED: u8 = 75;

/// Exit status when a second signal aborts the run at once: 130, the shell's code for an
/// interrupted command. Nothing more is written; the latest complete checkpoint stays the one a
/// resume picks (checkpoints are built under a temporary name and renamed into place).
pub const EXIT_ABORTED: i32 = 130;

/// Sets `stop` on the first SIGINT, SIGTERM or SIGHUP; exits the process on the second.
pub fn on_signals_set(stop: Arc<AtomicBool>) -> Result<()> {
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            // No message: stderr may be a full pipe, and this exit must not wait on it.
            std::process::exit(EXIT_ABORTED);
        }
        eprintln!(
            "\nstop requested (SIGINT, SIGTERM or SIGHUP): finishing the current step, then writing a checkpoint \
             and the metrics (a second signal aborts at once)"
        );
    })
    .context("installing the handler of SIGINT, SIGTERM and SIGHUP")
}
