//! Allocator tuning for binaries that use mimalloc as their global allocator (feature
//! `mimalloc`). A library never chooses the allocator; `ranger-tune` and the benchmarks do.

/// Keeps freed memory committed for reuse. Training frees and reallocates buffers of hundreds
/// of MB every step (logits, embedding gradients); returning them to the OS makes every step
/// page-fault them back in (measured: ~60 -> ~100 tokens/s on SmolLM2-135M, 2 cores).
/// Option numbers are mimalloc 2.x's `mi_option_e` (libmimalloc-sys does not name them all).
pub fn tune_mimalloc() {
    const MI_OPTION_ARENA_EAGER_COMMIT: i32 = 5;
    const MI_OPTION_PURGE_DELAY: i32 = 16;
    const MI_OPTION_ARENA_RESERVE: i32 = 24; // KiB
    // Environment variables (MIMALLOC_*) still win: they are what a user sets on purpose.
    let unset = |name: &str| std::env::var_os(name).is_none();
    unsafe {
        if unset("MIMALLOC_PURGE_DELAY") {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
        if unset("MIMALLOC_ARENA_EAGER_COMMIT") {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 1);
        }
        if unset("MIMALLOC_ARENA_RESERVE") {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_RESERVE, 8 * 1024 * 1024);
        }
    }
}

